"""`arbiter bench`: reproducible scenarios on the sim GPU with real Redis, real Celery workers and a real
beat, comparing policies in the same run. Each prints a table and can write JSON and a PNG plot."""
