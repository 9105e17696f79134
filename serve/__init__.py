"""Ray Serve application of the ALIP HTTP API (see serve/app.py and serve/config.yaml)."""
