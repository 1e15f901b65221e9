"""`--kernels`: which implementation each op family uses, for both trainers.

A spec is "auto" (our kernels everywhere), "off" (the record's own plain-PyTorch path
everywhere), or comma-separated `family=choice` pairs, e.g. "attention=flex,mlp=ours";
families not named take "auto".  Each trainer declares its families and their choices;
the first choice of a family is its "ours" (auto) and the second the record's ("off").
"""
from __future__ import annotations


def parse_kernels(spec: str, families: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Map every family to a choice; ValueError naming the bad part of `spec`."""
    ours = {family: choices[0] for family, choices in families.items()}
    record = {family: choices[1] for family, choices in families.items()}
    spec = spec.strip()
    if spec in ("auto", ""):
        return ours
    if spec == "off":
        return record
    chosen = dict(ours)
    for part in spec.split(","):
        family, sep, choice = part.strip().partition("=")
        if not sep:
            raise ValueError(f"--kernels: {part!r} is not family=choice (or use 'auto' / 'off')")
        if family not in families:
            raise ValueError(f"--kernels: unknown family {family!r}; families: {', '.join(families)}")
        if choice == "auto":
            choice = ours[family]
        elif choice == "off":
            choice = record[family]
        if choice not in families[family]:
            raise ValueError(f"--kernels: {family} can be {', '.join(families[family])} (or auto/off), "
                             f"got {choice!r}")
        chosen[family] = choice
    return chosen


def describe(chosen: dict[str, str], families: dict[str, tuple[str, ...]]) -> str:
    """One line for the run log: what each family uses and whether that is ours or the record's."""
    def origin(family, choice):
        return "ours" if choice == families[family][0] else "record" if choice == families[family][1] else "other"
    return ", ".join(f"{family}={choice} ({origin(family, choice)})" for family, choice in chosen.items())
