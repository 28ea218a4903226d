"""Routing: which team a post belongs to, at what priority, and which expert owns it.

Everything here is pure: a `Policy`, the post's fields, the time and the current load go in, a
decision comes out. Nothing reads the clock or the database.

Routing runs for every ingested post, so the per-policy work (compiling keyword patterns,
normalising author lists) and the per-expert work (building a `BusinessCalendar`) is done once
and kept for as long as the `Policy` or `Expert` object lives.
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

from bot.core.policy import Expert, Policy, Priority, RoutingRule
from bot.core.sla import BusinessCalendar

__all__ = ["OwnerChoice", "Route", "choose_owner", "classify", "is_on_duty"]


@dataclass(frozen=True)
class Route:
    """Where a post goes.

    Attributes:
        team: The team that answers it.
        priority: Its priority; VIP authors always get ``"urgent"``.
        topics: Topics named by the matching rule, used to prefer experts inside the team.
        rule: The name of the rule that matched, ``None`` when the default team was used.
        ignored: The author is on the ignore list: store the post, open no conversation.
    """

    team: str
    priority: Priority
    topics: tuple[str, ...]
    rule: str | None
    ignored: bool = False


@dataclass(frozen=True)
class OwnerChoice:
    """Who should own a conversation, and why.

    Attributes:
        expert_id: The chosen expert, ``None`` when nobody can take it.
        reason: ``"on_duty"`` (an expert at work with room), ``"on_call"`` (the team's on-call
            fallback, possibly off duty) or ``"nobody"``.
    """

    expert_id: str | None
    reason: Literal["on_duty", "on_call", "nobody"]


# --------------------------------------------------------------------------------------------
# Caches keyed by object identity: `Policy` and `Expert` hold dicts, so they are not hashable,
# and hashing them on every post would cost more than the work we want to save.

_Owner = TypeVar("_Owner")
_Value = TypeVar("_Value")


class _IdentityCache(Generic[_Owner, _Value]):
    """Values derived from an object, kept while that object is alive."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[_Owner], _Value]] = {}

    def get(self, owner: _Owner, build: Callable[[_Owner], _Value]) -> _Value:
        key = id(owner)
        entry = self._entries.get(key)
        # The identity check guards against a dead object's id being reused by a new one.
        if entry is not None and entry[0]() is owner:
            return entry[1]
        value = build(owner)
        entries = self._entries

        def forget(dead: weakref.ref[_Owner]) -> None:
            current = entries.get(key)
            if current is not None and current[0] is dead:
                entries.pop(key, None)

        entries[key] = (weakref.ref(owner, forget), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------------------------
# Matching helpers.


def _fold(text: str) -> str:
    """Normalise text for case-insensitive comparison (compatibility forms, full case folding)."""
    return unicodedata.normalize("NFKC", text).casefold()


def _normalise_handle(value: str) -> str:
    stripped = value.strip()
    if stripped.startswith("@"):
        stripped = stripped[1:]
    return stripped.casefold()


def _normalise_language(value: str) -> str:
    return value.strip().replace("_", "-").casefold()


# Scripts written without spaces between words (or, for Hangul, with particles glued to words):
# a keyword in these scripts matches as a substring, since "whole word" has no visible edge there.
_UNSPACED_SCRIPTS = (
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
    "THAI",
    "LAO",
    "KHMER",
    "MYANMAR",
    "TIBETAN",
)


def _needs_word_edge(character: str) -> bool:
    return not unicodedata.name(character, "").startswith(_UNSPACED_SCRIPTS)


def _keyword_pattern(keyword: str) -> str | None:
    folded = _fold(keyword).strip()
    if not folded:
        return None
    # A phrase matches across any run of whitespace ("refund  request", "refund\nrequest").
    body = r"\s+".join(re.escape(part) for part in folded.split())
    before = r"(?<!\w)" if _needs_word_edge(folded[0]) else ""
    after = r"(?!\w)" if _needs_word_edge(folded[-1]) else ""
    return before + body + after


def _compile_keywords(keywords: Iterable[str]) -> re.Pattern[str]:
    alternatives = [pattern for pattern in map(_keyword_pattern, keywords) if pattern is not None]
    if not alternatives:
        return re.compile(r"(?!)")  # a keyword list of blanks matches nothing, not everything
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives))


@dataclass(frozen=True, slots=True)
class _AuthorList:
    """A list of authors given as ids or handles (``"@Alice"``, ``"alice"``, ``"12345"``)."""

    ids: frozenset[str]
    handles: frozenset[str]

    @classmethod
    def of(cls, entries: Iterable[str]) -> _AuthorList:
        entries = tuple(entries)
        return cls(
            ids=frozenset(entry.strip() for entry in entries),
            handles=frozenset(_normalise_handle(entry) for entry in entries),
        )

    def __bool__(self) -> bool:
        return bool(self.ids)

    def contains(self, author_id: str, normalised_handle: str | None) -> bool:
        return author_id in self.ids or (normalised_handle is not None and normalised_handle in self.handles)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: RoutingRule
    accounts: frozenset[str]
    keywords: re.Pattern[str] | None
    authors: _AuthorList | None
    languages: tuple[str, ...]

    @classmethod
    def of(cls, rule: RoutingRule) -> _CompiledRule:
        return cls(
            rule=rule,
            accounts=frozenset(rule.accounts),
            keywords=_compile_keywords(rule.keywords) if rule.keywords else None,
            authors=_AuthorList.of(rule.authors) if rule.authors else None,
            languages=tuple(_normalise_language(language) for language in rule.languages),
        )


@dataclass(frozen=True, slots=True)
class _CompiledPolicy:
    rules: tuple[_CompiledRule, ...]
    vip: _AuthorList
    ignored: _AuthorList
    default_team: str | None

    @classmethod
    def of(cls, policy: Policy) -> _CompiledPolicy:
        return cls(
            rules=tuple(_CompiledRule.of(rule) for rule in policy.rules),
            vip=_AuthorList.of(policy.vip_authors),
            ignored=_AuthorList.of(policy.ignored_authors),
            default_team=policy.settings.default_team or next(iter(policy.teams), None),
        )


_compiled_policies: _IdentityCache[Policy, _CompiledPolicy] = _IdentityCache()


def _language_matches(wanted: tuple[str, ...], language: str | None) -> bool:
    if language is None:
        return False
    actual = _normalise_language(language)
    # "pt" admits "pt-BR"; "pt-BR" does not admit "pt" or "pt-PT".
    return any(actual == tag or actual.startswith(tag + "-") for tag in wanted)


# --------------------------------------------------------------------------------------------
# Public API: classification.


def classify(
    policy: Policy,
    *,
    account: str,
    author_id: str,
    author_handle: str | None,
    text: str,
    language: str | None = None,
) -> Route:
    """Route a post to a team and a priority with the policy's ordered rules.

    The first rule whose every non-empty condition matches wins:

    - ``accounts``: the post arrived on one of these accounts;
    - ``keywords``: any keyword occurs in the text as a whole word or phrase, ignoring case
      (Unicode case folding; keywords in scripts written without spaces match as substrings);
    - ``regex``: the pattern is found anywhere in the text;
    - ``authors``: the author's id, or handle compared ignoring case and a leading ``@``;
    - ``languages``: the post's language tag (``"pt"`` also admits ``"pt-BR"``).

    When no rule matches, the post goes to ``settings.default_team`` (or the first team) at
    ``"normal"`` priority. VIP authors raise the priority to ``"urgent"``; ignored authors are
    still routed but flagged ``ignored``.

    Args:
        policy: The validated policy.
        account: Name of the connector account the post arrived on.
        author_id: The platform's stable id for the author.
        author_handle: The author's handle, with or without ``@``, if known.
        text: The post's text.
        language: The post's language tag, if known (a rule with languages never matches a post
            whose language is unknown).

    Returns:
        The route: team, priority, topics, the matching rule's name and the ignore flag.

    Raises:
        LookupError: no rule matched and the policy has no team to fall back on.
    """
    compiled = _compiled_policies.get(policy, _CompiledPolicy.of)
    handle = _normalise_handle(author_handle) if author_handle else None
    folded_text: str | None = None

    matched: RoutingRule | None = None
    for candidate in compiled.rules:
        if candidate.accounts and account not in candidate.accounts:
            continue
        if candidate.keywords is not None:
            if folded_text is None:
                folded_text = _fold(text)
            if candidate.keywords.search(folded_text) is None:
                continue
        rule = candidate.rule
        if rule.regex is not None and rule.regex.search(text) is None:
            continue
        if candidate.authors is not None and not candidate.authors.contains(author_id, handle):
            continue
        if candidate.languages and not _language_matches(candidate.languages, language):
            continue
        matched = rule
        break

    if matched is not None:
        team, priority, topics, rule_name = matched.team, matched.priority, matched.topics, matched.name
    elif compiled.default_team is not None:
        team, priority, topics, rule_name = compiled.default_team, "normal", (), None
    else:
        raise LookupError(f"{policy.source}: no routing rule matched and no team is defined")

    if compiled.vip and compiled.vip.contains(author_id, handle):
        priority = "urgent"
    ignored = bool(compiled.ignored) and compiled.ignored.contains(author_id, handle)
    return Route(team=team, priority=priority, topics=topics, rule=rule_name, ignored=ignored)


# --------------------------------------------------------------------------------------------
# Public API: owners.


# One calendar per expert object: it memoises each local date's open periods, so keeping it
# across calls saves both the construction and the holiday look-ups.
_expert_calendars: _IdentityCache[Expert, BusinessCalendar] = _IdentityCache()


def _expert_calendar(expert: Expert) -> BusinessCalendar:
    return BusinessCalendar(expert.calendar())


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"routing needs a timezone-aware time, got {at!r}")


def is_on_duty(expert: Expert, at: datetime) -> bool:
    """Whether an expert is at work at a given instant.

    The expert is on duty when ``at`` falls within their working hours in their own time zone
    (holidays of their country excluded) and they are not away. ``away_until`` is a date in the
    expert's time zone: they are away through that whole local day.

    Args:
        expert: The expert.
        at: The instant, timezone-aware.

    Returns:
        True when the expert is working and not away.

    Raises:
        ValueError: ``at`` is naive.
    """
    _require_aware(at)
    calendar = _expert_calendars.get(expert, _expert_calendar)
    if expert.away_until is not None and at.astimezone(calendar.tz).date() <= expert.away_until:
        return False
    return calendar.is_open(at)


def choose_owner(
    policy: Policy,
    *,
    team: str,
    topics: Sequence[str],
    at: datetime,
    load: Mapping[str, int],
    last_assigned: str | None,
    exclude: Collection[str] = (),
) -> OwnerChoice:
    """Pick the expert who should own a new (or unclaimed) conversation of a team.

    Candidates are the team's experts, in the team's order, that are not excluded, are on duty
    at ``at`` and own fewer open conversations than their capacity. If some candidates cover one
    of ``topics``, only those are kept. The least loaded candidate wins; among equally loaded
    ones, the first after ``last_assigned`` in team order (wrapping round) wins, so successive
    assignments rotate. With no candidate, the team's on-call expert is chosen even off duty,
    unless excluded.

    Args:
        policy: The validated policy.
        team: The team's name.
        topics: The conversation's topics (from its route); empty for no preference.
        at: The instant of assignment, timezone-aware.
        load: Open conversations owned, by expert id; missing ids count as zero.
        last_assigned: The team's most recently assigned expert, for round robin.
        exclude: Experts not to choose, e.g. the one who let the conversation go unclaimed.

    Returns:
        The chosen expert and why, or ``OwnerChoice(None, "nobody")``.

    Raises:
        KeyError: the team is not in the policy.
        ValueError: ``at`` is naive.
    """
    _require_aware(at)
    team_spec = policy.teams[team]
    order = tuple(dict.fromkeys(team_spec.experts))

    candidates: list[Expert] = []
    for expert_id in order:
        if expert_id in exclude:
            continue
        expert = policy.experts.get(expert_id)
        if expert is None:  # validation reports dangling ids; routing just skips them
            continue
        if load.get(expert_id, 0) >= expert.capacity or not is_on_duty(expert, at):
            continue
        candidates.append(expert)

    if candidates:
        wanted = {_fold(topic) for topic in topics}
        if wanted:
            specialists = [e for e in candidates if any(_fold(topic) in wanted for topic in e.topics)]
            if specialists:
                candidates = specialists
        lowest = min(load.get(expert.id, 0) for expert in candidates)
        tied = [expert.id for expert in candidates if load.get(expert.id, 0) == lowest]
        position = {expert_id: index for index, expert_id in enumerate(order)}
        start = 0
        if last_assigned is not None and last_assigned in position:
            start = position[last_assigned] + 1
        chosen = min(tied, key=lambda expert_id: (position[expert_id] - start) % len(order))
        return OwnerChoice(expert_id=chosen, reason="on_duty")

    on_call = team_spec.on_call
    if on_call is not None and on_call not in exclude:
        return OwnerChoice(expert_id=on_call, reason="on_call")
    return OwnerChoice(expert_id=None, reason="nobody")
