"""Serving a VLM: an OpenAI-compatible HTTP server (`monovlm serve`) and the terminal chat (`monovlm chat`).

    limits.py     what one request may ask for, and the JSON error every refusal becomes
    messages.py   an OpenAI chat request (JSON) -> validated turns, image bytes and generation options
    prompt.py     turns + images -> token ids, the way the processor builds training samples (shared with chat)
    batching.py   one worker thread: a bounded queue, compatible requests grouped into one batched generation
    app.py        the FastAPI app: endpoints, admission, streaming (server-sent events), the web page
    terminal.py   the terminal chat session behind `monovlm chat`

Nothing here imports FastAPI at package import, so `monovlm chat` does not pay for it.
"""
