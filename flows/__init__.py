"""flows: the pipeline around the model: feeds in, templated prompts out, a SQLite store.

The modules here are plain libraries (no Prefect inside them); a later layer wraps them in
Prefect flows. Only ``cli`` (and later the flows) glue them to ``yalm_runner``.
"""

__version__ = "0.1.0"
