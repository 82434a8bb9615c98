"""Where a model's words come from (OLMoTrace on a laptop): an index over the exact token streams the model was
trained on (`index.py`, a stage) and the search for the long verbatim spans of a text that occur in them
(`query.py`, `clearlm trace`)."""
