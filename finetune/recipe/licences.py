"""Licences and rights statements a record may carry, and which intended uses of a model each permits.

A licence is an SPDX id (`CC-BY-NC-4.0`), one of the rightsstatements.org statements cultural-heritage
institutions use (`InC-EDU`), or a custom statement the recipe declares in `data.policy.custom_licences`.
The catalogue below answers one question per licence: which intended uses of the trained model
(`research`, `non-commercial`, `commercial`, `internal`) may train on material under it. It is a
conservative reading for planning, not legal advice; a recipe can narrow it (`licences:`) or declare
its own statements.

The conservative reading of a no-derivatives licence (CC BY-ND, BY-NC-ND): a model trained on the material
may be an adaptation of it, which the licence does not allow, so such material trains for no use unless the
recipe's policy explicitly allows it — by naming the licence in `data.policy.licences` (then it trains for
the uses its other terms permit: any for BY-ND, research and non-commercial for BY-NC-ND) or by declaring
its uses in `custom_licences`.
"""

from __future__ import annotations

import difflib

USES = ("research", "non-commercial", "commercial", "internal")
_ALL = frozenset(USES)
_NON_COMMERCIAL = frozenset({"research", "non-commercial"})
_NONE: frozenset[str] = frozenset()


def _catalogue() -> dict[str, frozenset[str]]:
    known: dict[str, frozenset[str]] = {}
    for version in ("1.0", "2.0", "2.5", "3.0", "4.0"):
        for kind in ("BY", "BY-SA", "BY-ND"):  # BY-ND: only where explicitly allowed (NO_DERIVATIVES)
            known[f"CC-{kind}-{version}"] = _ALL
        # a commercial model must not train on NC material; an internal model of a company is commercial use
        for kind in ("BY-NC", "BY-NC-SA", "BY-NC-ND"):
            known[f"CC-{kind}-{version}"] = _NON_COMMERCIAL
    for spdx in (
        "CC0-1.0",
        "CC-PDDC",
        "CC-PDM-1.0",
        "PDDL-1.0",
        "ODC-By-1.0",
        "ODbL-1.0",
        "OGL-UK-3.0",
        "MIT",
        "Apache-2.0",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "Unlicense",
        "GFDL-1.3-or-later",
    ):
        known[spdx] = _ALL
    # rightsstatements.org (the short ids museums and archives use, e.g. in Europeana)
    known.update(
        {
            "NKC": _ALL,  # no known copyright
            "NoC-NC": _NON_COMMERCIAL,  # no copyright, non-commercial use only
            "InC-NC": _NON_COMMERCIAL,  # in copyright, non-commercial use permitted
            "InC-EDU": frozenset({"research"}),  # in copyright, educational use permitted
            "InC": _NONE,  # in copyright: only what the rights holder grants (declare it)
            "NoC-OKLR": _NONE,  # other known legal restrictions
            "CNE": _NONE,  # copyright not evaluated
            "UND": _NONE,  # copyright undetermined
        }
    )
    return known


KNOWN_LICENCES = _catalogue()
NO_DERIVATIVES = frozenset(name for name in KNOWN_LICENCES if name.startswith("CC-") and "-ND-" in name)
_BY_FOLDED = {name.casefold(): name for name in KNOWN_LICENCES}


def canonical(name: str, custom: dict[str, list[str]] | None = None) -> str | None:
    """The catalogue or custom spelling of a licence name (case-insensitive), or None if unknown."""
    custom = custom or {}
    folded = name.strip().casefold()
    for declared in custom:
        if declared.casefold() == folded:
            return declared
    return _BY_FOLDED.get(folded)


def permitted_uses(
    licence: str, custom: dict[str, list[str]] | None = None, explicitly_allowed: bool = False
) -> frozenset[str]:
    """The intended uses a canonical licence permits (a custom declaration wins over the catalogue); a
    no-derivatives licence permits none unless `explicitly_allowed` (named in `data.policy.licences`)."""
    custom = custom or {}
    if licence in custom:
        return frozenset(custom[licence])
    if licence in NO_DERIVATIVES and not explicitly_allowed:
        return _NONE
    return KNOWN_LICENCES.get(licence, _NONE)


def needs_explicit_allowance(licence: str, use: str, custom: dict[str, list[str]] | None = None) -> bool:
    """Whether `licence` would permit `use` only if the policy named it: a no-derivatives licence, not declared."""
    return (
        licence not in (custom or {})
        and licence in NO_DERIVATIVES
        and use in permitted_uses(licence, custom, explicitly_allowed=True)
    )


def unknown_licence_message(name: str, custom: dict[str, list[str]] | None = None) -> str:
    """Why `name` is not accepted, with the closest known id and how to declare a custom statement."""
    choices = [*KNOWN_LICENCES, *(custom or {})]
    guess = difflib.get_close_matches(name.upper(), [c.upper() for c in choices], n=1, cutoff=0.75)
    hint = ""
    if guess:
        hint = " — did you mean " + next(c for c in choices if c.upper() == guess[0]) + "?"
    return (
        f"licence {name!r} is not a known SPDX id or rights statement{hint} "
        "(e.g. CC0-1.0, CC-BY-4.0, CC-BY-NC-SA-4.0, InC-EDU); declare your own under "
        "data.policy.custom_licences with the uses it permits"
    )
