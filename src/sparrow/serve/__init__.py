"""The OpenAI-compatible server (`sparrow serve`) and the terminal chat (`sparrow chat`).

    prompt.py        multi-turn chat rendering with the video placeholder; streaming detokenizer
    schemas.py       the request body (pydantic: validation + the OpenAPI document)
    media.py         where a video part may come from (media roots, data URLs, size limits)
    prepare.py       a request turned into the engine's inputs (limits, video, prompt ids)
    engine.py        the single generation worker behind a bounded FIFO queue
    prefix_cache.py  video prefills kept for follow-up questions, within a byte bound
    errors.py        errors in OpenAI's shape, and the application's exception handlers
    completions.py   POST /v1/chat/completions: one request, from its body to JSON or SSE
    app.py           the FastAPI application: settings, routes, /health, /v1/models, API key
    server.py        uvicorn launch, and a background server for tests
    chat.py          the interactive terminal chat
"""
