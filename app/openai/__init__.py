"""OpenAI's completions API: ``protocol`` (its bodies), ``completions`` (the translation to
and from the service), ``cards`` (the model cards of ``/v1/models``); the routes are in
``app/routes/openai.py``."""
