"""Security building blocks: keys at rest, upstream address policy, tokens, auth, limits.

Each module is pure (no web layer, no settings object) so the use cases can call it directly:

- `crypto`: AES-256-GCM for API keys at rest, with key rotation, and `mask` for display.
- `ssrf`: which upstream addresses chatgate may connect to, at write time and connect time.
- `tokens`: chatgate's own API tokens (generation, hashing for storage).
- `supabase`: verification of Supabase access tokens and the session cookie format.
- `limits`: per-user request rate and concurrent-stream limits.
"""
