"""CDS clients' verification keys, parsed once at start (PEM or a JWKS with ``kid``s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from jwt.algorithms import get_default_algorithms


class KeyConfig(Protocol):
    public_key: str | None
    jwks: dict[str, Any] | None
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class ClientKeys:
    """One client's keys: by ``kid`` (JWKS), or the single PEM key (``default``)."""

    by_kid: dict[str, Any]
    default: Any
    algorithms: tuple[str, ...]

    def key_for(self, kid: str | None) -> Any | None:
        if self.default is not None:
            return self.default
        return self.by_kid.get(kid) if isinstance(kid, str) else None


def client_keys(cfg: KeyConfig) -> ClientKeys:
    """Parse a client's keys; a key that does not parse, a JWK without ``kid`` or a
    symmetric JWK is a ``ValueError`` naming it."""
    if cfg.public_key is not None:
        algs = get_default_algorithms()
        kinds = {type(algs[a]) for a in cfg.algorithms}
        if len(kinds) != 1:
            raise ValueError("a PEM key serves one key type: list algorithms of one family "
                             "(RS*, PS*, ES* or EdDSA), or register a JWKS")
        try:
            key = algs[cfg.algorithms[0]].prepare_key(cfg.public_key)
        except Exception as exc:
            raise ValueError(f"public_key does not parse as a PEM public key "
                             f"({type(exc).__name__})") from None
        if hasattr(key, "private_bytes"):
            raise ValueError("public_key is a private key: register the public half only")
        return ClientKeys({}, key, cfg.algorithms)
    keys = (cfg.jwks or {}).get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError("jwks needs a non-empty 'keys' list")
    by_kid = {}
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            raise ValueError(f"jwks key {i} has no kid")
        if jwk.get("kty") == "oct":
            raise ValueError(f"jwks key {jwk['kid']!r} is symmetric: asymmetric keys only")
        if any(m in jwk for m in ("d", "p", "q", "dp", "dq", "qi")):
            raise ValueError(f"jwks key {jwk['kid']!r} holds private members: register "
                             "the public key only")
        try:
            by_kid[jwk["kid"]] = jwt.PyJWK.from_dict(jwk).key
        except Exception as exc:
            raise ValueError(f"jwks key {jwk['kid']!r} does not parse "
                             f"({type(exc).__name__})") from None
    return ClientKeys(by_kid, None, cfg.algorithms)
