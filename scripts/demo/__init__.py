"""A browser demo a person can use: ``make demo`` (``python -m scripts.demo``) serves a Gradio page on
127.0.0.1:7860 that sends images to the running model through the gateway's inference API, with the
inference key read server-side from key_file.json and never sent to the browser.

backend.py talks to the API and turns every failure into one plain sentence; app.py is the page
(single image with its explanation, and a gallery for several images at once).
"""
