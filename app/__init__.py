"""The generation service: a FastAPI app that serves a trained run folder over HTTP.

Run it with ``python -m app --model-dir RUN_DIR`` (see ``app/__main__.py``) or
``uvicorn --factory app.main:create_app`` with ``WORDRNN_MODEL_DIR`` set.
"""
