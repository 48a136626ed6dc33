"""The doors: each turns its own input into ``Worker`` calls. ``jobs`` is the RunPod job door
(``handler.py`` wraps it), ``server`` the HTTP server (``python -m llm_worker.doors.server``) with
its Prometheus ``metrics``. No door imports another."""
