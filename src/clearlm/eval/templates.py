"""The Jinja environment of task files: lm-evaluation-harness's conventions (an undefined field is an error, a
trailing newline is kept), each template compiled once."""

from __future__ import annotations

import functools

import jinja2

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@functools.cache
def compiled(template: str) -> jinja2.Template:
    """The compiled template; a syntax error raises jinja2.TemplateSyntaxError (a task file's validation turns it
    into a one-line error naming the file and the field)."""
    return _ENV.from_string(template)
