"""OpenAI's image API (``/v1/images/edits``, ``/v1/images/generations``) on this server's engine.

A thin adapter: a request becomes one or more predictions in the same store, queue and lifecycle as
Replicate's (recorded with ``api="openai"``), and their outputs are answered in OpenAI's shapes.
"""
