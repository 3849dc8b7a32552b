"""``gradindex serve``: a read-only attribution browser over one opened index.

- ``app.create_app(index, data=None, results=None, limits=None)``: the Starlette app (pages:
  query form, top-k per method side by side, a training row's details, a viewer for
  ``gradindex query --output results.jsonl``).
- ``state.ServeState``: what the pages read — the index, its training images, the reach of
  every training row (computed once at startup), uploaded results.
- ``images``: training images by row number (never by a path from a request) and thumbnails.
- ``uploads``: query images and results files from the browser, with size limits.
- ``limits.Limits``: what one request may send and ask for; ``guard``: the body-size check
  and the security headers (CSP, no framing) every answer carries.

Needs the ``serve`` extra (starlette, uvicorn, python-multipart, jinja2).
"""
