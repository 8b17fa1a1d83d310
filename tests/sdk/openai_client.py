"""Drives weir with the official OpenAI Python SDK (tests/sdk.rs runs it).

Usage: openai_client.py BASE_URL MODEL SCENARIO
Prints one JSON line with what the SDK saw; exits non-zero on surprise.
"""
import json
import sys

import openai
from openai import OpenAI

base_url, model, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key="client-key-1", max_retries=0, timeout=20)
out = {}

if scenario == "chat":
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}]
    )
    out["content"] = reply.choices[0].message.content
    out["usage_total"] = reply.usage.total_tokens
    text = []
    usage_chunks = 0
    for chunk in client.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": "Hello"}]
    ):
        if chunk.usage is not None:
            usage_chunks += 1
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
    out["streamed"] = "".join(text)
    out["usage_chunks"] = usage_chunks
    emb = client.embeddings.create(model=model, input="hi")
    out["embedding_len"] = len(emb.data[0].embedding)
    out["models"] = [m.id for m in client.models.list()]
elif scenario == "errors":
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        out["not_found"] = "no exception"
    except openai.NotFoundError as e:
        out["not_found"] = e.code
    try:
        client.chat.completions.create(model=model, messages="not a list", extra_body={"model": 5})
        out["bad_request"] = "no exception"
    except openai.BadRequestError as e:
        out["bad_request"] = e.code
elif scenario == "rate_limit":
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        out["rate_limited"] = "no exception"
    except openai.RateLimitError as e:
        out["rate_limited"] = e.code
        out["retry_after"] = e.response.headers.get("retry-after")
elif scenario == "shutdown":
    # A stream, then (once it runs) a second request that queues behind it;
    # the test ends weir's shutdown grace while both are under way.
    import threading

    def wait():
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
            out["waiter"] = "no exception"
        except openai.APIStatusError as e:
            out["waiter"] = [e.status_code, e.code]
        except openai.APIError as e:
            out["waiter"] = [type(e).__name__, e.message]

    waiter = threading.Thread(target=wait)
    chunks = 0
    try:
        for chunk in client.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": "Hello"}]
        ):
            chunks += 1
            if chunks == 1:
                waiter.start()
        out["stream"] = "no exception"
    except openai.APIError as e:
        out["stream"] = [type(e).__name__, e.code, e.message]
    out["chunks"] = chunks
    waiter.join()
else:
    sys.exit(f"unknown scenario {scenario}")

print(json.dumps(out))
