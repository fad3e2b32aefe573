"""Which IKE and ESP proposals a fabmesh tunnel may use: an allow-list, checked before charon sees them.

charon takes proposals as free strings and will happily negotiate ``aes128-sha1-modp1024`` if both
sides offer it, so a typo or a copied example quietly weakens every tunnel in the mesh. We accept
only AEAD ciphers (no separate integrity algorithm to get wrong), PRFs from SHA-2, and DH groups of
at least 128-bit strength. ESP proposals must carry a DH group too: without one a CHILD_SA rekey
reuses the IKE_SA's key material (no perfect forward secrecy). strongSwan leaves the group out of
the CHILD_SA created with IKE_AUTH and uses it on every rekey, so both sides must list one.

The tokens are strongSwan's keywords, in the order strongSwan documents and prints them
(encryption, then PRF, then DH group; one or more of each), so the same rule can be written as the
regular expression the Helm chart's ``values.schema.json`` carries (see :func:`proposal_pattern`).
``x25519``/``x448`` come from the ``openssl`` plugin: Debian's strongSwan ships no ``curve25519``
plugin, and ``curve25519``/``curve448`` are the same groups under strongSwan's older names.
"""

from __future__ import annotations

from enum import StrEnum

AEAD = ("aes128gcm16", "aes256gcm16", "chacha20poly1305")
PRF = ("prfsha256", "prfsha384", "prfsha512")
DH = ("ecp256", "ecp384", "ecp521", "x25519", "x448", "curve25519", "curve448",
      "modp3072", "modp4096", "modp6144", "modp8192")


class Kind(StrEnum):
    IKE = "ike"
    ESP = "esp"


# The classes of token a proposal is made of, in order; every class is required.
_GRAMMAR: dict[Kind, tuple[tuple[str, tuple[str, ...]], ...]] = {
    Kind.IKE: (("AEAD cipher", AEAD), ("PRF", PRF), ("DH group", DH)),
    Kind.ESP: (("AEAD cipher", AEAD), ("DH group", DH)),
}


def proposal_problem(kind: Kind, proposal: str) -> str | None:
    """Why ``proposal`` is not allowed, or None when it is."""
    grammar = _GRAMMAR[kind]
    phase, seen = 0, 0  # index into the grammar, and how many tokens of that class so far
    for token in proposal.split("-"):
        name, allowed = grammar[phase]
        if token in allowed:
            seen += 1
            continue
        if seen and phase + 1 < len(grammar) and token in grammar[phase + 1][1]:
            phase, seen = phase + 1, 1
            continue
        expected = [name] + ([grammar[phase + 1][0]] if seen and phase + 1 < len(grammar) else [])
        choices = [a for n, a in grammar if n in expected]
        listed = "; ".join(f"{n}: {', '.join(a)}" for n, a in zip(expected, choices, strict=True))
        return f"{token!r} is not an allowed {' or '.join(expected)} here ({listed})"
    if phase < len(grammar) - 1:
        missing = [n for n, _ in grammar[phase + 1:]]
        return f"no {' and no '.join(missing)}; write {_SHAPE[kind]}"
    return None


_SHAPE = {Kind.IKE: "cipher-prf-group, e.g. aes256gcm16-prfsha256-ecp256",
          Kind.ESP: "cipher-group, e.g. aes256gcm16-ecp256 (the group gives a CHILD_SA rekey PFS)"}


def proposal_pattern(kind: Kind) -> str:
    """The same rule as a regular expression (JSON Schema / ECMA-262 dialect), for values.schema.json."""
    parts = []
    for _, allowed in _GRAMMAR[kind]:
        alt = "|".join(allowed)
        parts.append(f"({alt})(-({alt}))*")
    return "^" + "-".join(parts) + "$"
