"""Openness: MOF components and classes, licences, the OSAID checklist, and the audit of any model folder."""
