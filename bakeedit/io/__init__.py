"""The io layer: safetensors shards (headers, byte ranges, copies), atomic staged outputs, hashing and
line-numbered readers. It imports nothing of bakeedit but ``bakeedit.errors``, so every layer above may use it."""
