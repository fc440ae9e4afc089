"""The OpenAI-compatible server (`sparrow serve`) and the terminal chat (`sparrow chat`).

    prompt.py   multi-turn chat rendering with the video placeholder; streaming detokenizer
    schemas.py  the request body (pydantic: validation + the OpenAPI document)
    media.py    where a video part may come from (media roots, data URLs, size limits)
    engine.py   the single generation worker behind a bounded FIFO queue
    app.py      the FastAPI application: endpoints, errors in OpenAI's shape, API key
    server.py   settings, uvicorn launch, and a background server for tests
    chat.py     the interactive terminal chat
"""
