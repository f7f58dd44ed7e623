"""Hugging Face's text-generation protocol (as its Text Generation Inference server speaks
it, and ``huggingface_hub.InferenceClient.text_generation`` calls it): ``protocol`` (its
bodies) and ``translate`` (to and from the service); the routes are in ``app/routes/tgi.py``."""
