"""Customer-facing dates, times, time zones and durations in the customer's language (Babel).

Staff-facing text stays English (`bot.core.messages`); what a customer reads in an
acknowledgement is formatted here with the CLDR data shipped in Babel, for the locale of the
template that was chosen, so a German template says "Dienstag 12:00 MEZ" and never "Tuesday".

Language choice (`language_candidates`): the platform's language field of the post (``pt-BR``,
then ``pt``), else the team's language, else English. The template that is found first decides
the locale its placeholders are formatted in.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime, format_skeleton
from babel.lists import format_list
from babel.units import format_unit

__all__ = [
    "GREETING",
    "OVERDUE",
    "PROMISE",
    "SOMEONE",
    "TIME_WORDS",
    "babel_locale",
    "duration_words",
    "greeting",
    "language_candidates",
    "local_due_label",
    "overdue_wording",
    "promise_pattern",
    "someone",
    "time_words",
    "zone_label",
]

# When no expert is assigned, {owner} and {owner_first_name} read "someone" in the template's language.
SOMEONE: dict[str, str] = {
    "en": "someone",
    "de": "jemand",
    "fr": "quelqu'un",
    "es": "alguien",
    "pt": "alguém",
    "nl": "iemand",
    "it": "qualcuno",
    "ja": "担当者",
    "ar": "أحد الموظفين",
}

# What {author} becomes when the platform does not verify handles and the policy sets no
# `ack_greeting`: words that read naturally after the shipped templates' "Thanks"/"Danke"/...
GREETING: dict[str, str] = {
    "en": "there",
    "de": "dir",
    "fr": "à vous",
    "es": "a ti",
    "pt": "a você",
    "nl": "daarvoor",
    "it": "a te",
}

# A post overdue on arrival is promised an answer "as soon as possible", in the template's language.
OVERDUE: dict[str, str] = {
    "en": "as soon as possible",
    "de": "so bald wie möglich",
    "fr": "dès que possible",
    "es": "lo antes posible",
    "pt": "o mais rápido possível",
    "nl": "zo snel mogelijk",
    "it": "il prima possibile",
    "ja": "できるだけ早く",
    "ar": "في أقرب وقت ممكن",
}

# What {promise} becomes while the deadline is ahead ({due}: the deadline as `local_due_label`
# writes it); overdue on arrival it becomes the language's OVERDUE wording instead.
PROMISE: dict[str, str] = {
    "en": "by {due}",
    "de": "bis {due}",
    "fr": "d'ici {due}",
    "es": "antes del {due}",
    "pt": "até {due}",
    "nl": "uiterlijk {due}",
    "it": "entro {due}",
    "ja": "{due}までに",
    "ar": "بحلول {due}",
}

# The words a template puts right before {due} or {due_in} ("within", "bis", "d'ici"...): when
# the post is already overdue they go with the time, so "antwortet innerhalb von {due_in}"
# reads "antwortet so bald wie möglich" and no language's own words are left dangling.
TIME_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("within", "in", "by", "before"),
    "de": ("innerhalb von", "innerhalb", "binnen", "in", "bis", "vor"),
    "fr": ("d'ici", "d\u2019ici", "sous", "dans", "avant", "en"),
    "es": ("antes del", "antes de", "dentro de", "en"),
    "pt": ("dentro de", "antes de", "até", "em"),
    "nl": ("uiterlijk", "binnen", "vóór", "voor", "in"),
    "it": ("entro", "prima di", "tra", "fra"),
}

_DIGIT = re.compile(r"\d")


def language_candidates(post_language: str | None, team_language: str) -> list[str]:
    """Languages to look for a template in, best first: the post's (full tag, then its primary
    language), then the team's (likewise), then English; without repeats."""
    found: list[str] = []
    for tag in (post_language, team_language, "en"):
        if not tag:
            continue
        tag = tag.strip().replace("_", "-")
        for candidate in (tag, tag.split("-")[0].lower()):
            if candidate and candidate not in found:
                found.append(candidate)
    return found


@lru_cache(maxsize=128)
def babel_locale(language: str) -> Locale:
    """The Babel locale for a language tag (``de``, ``pt-BR``); its primary language, else English."""
    for tag in (language, language.split("-")[0]):
        try:
            return Locale.parse(tag.replace("-", "_"))
        except (UnknownLocaleError, ValueError, TypeError):
            continue
    return Locale.parse("en")


def someone(language: str) -> str:
    """The word for an unnamed colleague in a language (English when we have none)."""
    return SOMEONE.get(language.split("-")[0].lower(), SOMEONE["en"])


def greeting(language: str) -> str:
    """The stand-in for an unverified customer's name in a language (English when we have none)."""
    return GREETING.get(language.split("-")[0].lower(), GREETING["en"])


def _primary(language: str) -> str:
    return language.split("-")[0].lower()


def overdue_wording(language: str) -> str:
    """ "As soon as possible" in a language (English when we have none)."""
    return OVERDUE.get(_primary(language), OVERDUE["en"])


def time_words(language: str) -> tuple[str, ...]:
    """The words that may stand before {due} / {due_in} in a template of this language."""
    return TIME_WORDS.get(_primary(language), ())


def promise_pattern(language: str) -> str:
    """The {promise} phrase of a language while the deadline is ahead (``bis {due}``)."""
    return PROMISE.get(_primary(language), PROMISE["en"])


def zone_label(at: datetime, tz: ZoneInfo, language: str) -> str:
    """The time zone as the locale names it at that instant: its abbreviation where the locale
    has one (``MEZ``, ``CET``), else the specific long name (``Central European Standard Time``,
    ``中央ヨーロッパ標準時``), never a bare offset."""
    locale = babel_locale(language)
    short = format_datetime(at, "z", tzinfo=tz, locale=locale)
    if not _DIGIT.search(short):
        return short
    return format_datetime(at, "zzzz", tzinfo=tz, locale=locale)


def local_due_label(at: datetime, tz: ZoneInfo, language: str) -> str:
    """A deadline as the customer reads it: weekday, local time and zone, all in the locale
    (``Dienstag 12:00 MEZ``, ``Tuesday 12:00 Central European Standard Time``)."""
    locale = babel_locale(language)
    weekday = format_datetime(at, "EEEE", tzinfo=tz, locale=locale)
    # The locale's own 24-hour pattern (skeleton "Hm"): deadlines read the same on every channel.
    clock = format_skeleton("Hm", at, tzinfo=tz, locale=locale)
    return f"{weekday} {clock} {zone_label(at, tz, language)}"


def duration_words(delta: timedelta, language: str) -> str:
    """A duration in words, its two largest units joined as the locale joins a list
    (``3 Stunden und 20 Minuten``, ``2 días y 4 horas``); under a minute reads as one minute."""
    locale = babel_locale(language)
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        parts = [(days, "duration-day"), (hours, "duration-hour")]
    elif hours:
        parts = [(hours, "duration-hour"), (minutes, "duration-minute")]
    else:
        parts = [(max(minutes, 1), "duration-minute")]
    words = [format_unit(value, unit, length="long", locale=locale) for value, unit in parts if value]
    return format_list(words, style="standard", locale=locale)
