"""Customer-facing text in the customer's language: Babel formats dates, times, zones, durations."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from babel.dates import format_datetime
from sqlalchemy import Engine, select

from bot.config import load_policy
from bot.core.clock import FakeClock
from bot.core.locale_text import (
    OVERDUE,
    PROMISE,
    TIME_WORDS,
    duration_words,
    language_candidates,
    local_due_label,
)
from bot.core.messages import render_acknowledgement
from bot.core.policy import Team
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from connectors.base import InboundPost
from storage.models import Outbox

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "replyclock.toml"
LANGUAGES = ("en", "de", "fr", "es", "pt", "nl", "it")
# A German, a Japanese and an Arabic date context: the team's time zone.
ZONES = ("Europe/Berlin", "Asia/Tokyo", "Asia/Riyadh")
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # Monday
DUE = datetime(2026, 11, 24, 11, 20, tzinfo=UTC)  # Tuesday, 1 day 3 h 20 min later
TUESDAY = {
    "en": "Tuesday",
    "de": "Dienstag",
    "fr": "mardi",
    "es": "martes",
    "pt": "terça-feira",
    "nl": "dinsdag",
}
TUESDAY["it"] = "martedì"
# English words our formatting or our fallbacks could put into a customer's text.
ENGLISH = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Mon",
    "Tue",
    "Wed",
    "Thu",
    "Fri",
    "Sat",
    "Sun",
    "January",
    "February",
    "March",
    "April",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "hour",
    "hours",
    "minute",
    "minutes",
    "there",  # the English greeting for a customer without a verified handle
    "min",
    "day",
    "days",
    "someone",
    "under",
    "European",
    "Japan",
    "Arabian",
    "Thanks",
    "within",
    "answer",
    "will",
    "by",
    "due",
]
CASE_SENSITIVE = ("AM", "PM", "Standard", "Time")


def english_words(text: str) -> list[str]:
    found = [w for w in ENGLISH if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, flags=re.IGNORECASE)]
    return found + [w for w in CASE_SENSITIVE if re.search(rf"(?<!\w){w}(?!\w)", text)]


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("language", LANGUAGES)
def test_every_shipped_template_renders_without_english_words_of_ours(language: str, zone: str) -> None:
    policy = load_policy(EXAMPLE)
    assert set(policy.acknowledgements["default"]) == set(LANGUAGES)
    template = policy.acknowledgements["default"][language]
    team = Team(name="t", channel="#t", experts=(), calendar="c", display_name="Acme")
    tz = ZoneInfo(zone)
    # A named owner or none; a verified handle or none (then the language's own greeting word).
    for owner, author in itertools.product((policy.experts["carla"], None), ("@ana", None)):
        text = render_acknowledgement(
            template,
            author=author,
            owner=owner,
            team=team,
            due_at=DUE,
            timezone=tz,
            now=NOW,
            language=language,
        )
        assert TUESDAY[language] in text
        assert format_datetime(DUE, "HH:mm", tzinfo=tz) in text
        assert duration_words(DUE - NOW, language) in text
        if language != "en":
            assert english_words(text) == [], text
        else:
            assert "Tuesday" in text and "1 day and 3 hours" in text


@pytest.mark.parametrize("zone", ZONES)
def test_dates_and_durations_come_from_babel(zone: str) -> None:
    tz = ZoneInfo(zone)
    german = local_due_label(DUE, tz, "de")
    assert german.startswith("Dienstag ") and english_words(german) == []
    assert local_due_label(DUE, ZoneInfo("Europe/Berlin"), "de") == "Dienstag 12:20 MEZ"
    assert local_due_label(DUE, ZoneInfo("Asia/Tokyo"), "ja").startswith("火曜日 20:20")
    assert local_due_label(DUE, ZoneInfo("Asia/Riyadh"), "ar").startswith("الثلاثاء")
    assert duration_words(timedelta(hours=3, minutes=20), "de") == "3 Stunden und 20 Minuten"
    assert duration_words(timedelta(seconds=20), "fr") == "1 minute"


def test_language_from_the_platform_else_the_team() -> None:
    assert language_candidates("pt-BR", "de") == ["pt-BR", "pt", "de", "en"]
    assert language_candidates(None, "de") == ["de", "en"]
    assert language_candidates("en", "en") == ["en"]


def _ingest(ctx: AppContext, post: InboundPost) -> str:
    with ctx.sessions() as session, session.begin():
        ingest_batch(session, ctx, account="x", posts=[post], is_own=lambda _p: False)
    with ctx.sessions() as session:
        return str(
            session.scalars(
                select(Outbox.payload).where(Outbox.kind == "ack").order_by(Outbox.id.desc())
            ).first()["text"]
        )


def test_the_german_acknowledgement_names_dienstag_and_the_german_zone(engine: Engine) -> None:
    monday = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # 11:00 in Berlin
    ctx = AppContext(policy=load_policy(EXAMPLE), engine=engine, clock=FakeClock(monday))
    post = InboundPost("1", "id-ana", "Meine Rechnung ist falsch", monday, author_handle="ana")
    text = _ingest(ctx, post)  # billing (German team), no language from the platform
    due = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)  # 8 business hours later: Tuesday 11:00 Berlin
    zone = format_datetime(due, "z", tzinfo=ZoneInfo("Europe/Berlin"), locale="de")
    assert zone == "MEZ"
    assert (
        text == f"Danke @ana! Anna aus der Buchhaltung antwortet bis Dienstag 11:00 {zone} (Mo-Fr 9-17 Uhr)."
    )
    # The platform says Portuguese (Brazil): the shipped "pt" template, formatted in Portuguese.
    post = InboundPost(
        "2", "id-bia", "Onde está o meu pedido?", monday, author_handle="bia", language="pt-BR"
    )
    text = _ingest(ctx, post)
    assert text.startswith("Obrigado @bia! Recebemos a sua mensagem:") and "terça-feira" in text
    assert english_words(text) == []


OVERDUE_NOW = NOW + timedelta(minutes=5)  # the post came in after its deadline (DUE - 1 day...)


@pytest.mark.parametrize("language", LANGUAGES)
def test_an_overdue_post_is_promised_an_answer_in_its_own_language(language: str) -> None:
    """Overdue on arrival: the language's own "as soon as possible" takes the first time phrase,
    the words before it ("innerhalb von", "d'ici"...) and the other time phrases go."""
    policy = load_policy(EXAMPLE)
    team = Team(name="t", channel="#t", experts=(), calendar="c", display_name="Acme")
    tz = ZoneInfo("Europe/Berlin")
    shipped = policy.acknowledgements["default"][language]
    with_promise = "{author}: {owner_first_name} ({team}) {promise}."
    for template in (shipped, with_promise):
        text = render_acknowledgement(
            template,
            author="@ana",
            owner=policy.experts["carla"],
            team=team,
            due_at=NOW,
            timezone=tz,
            now=OVERDUE_NOW,
            language=language,
        )
        assert text.count(OVERDUE[language]) == 1, text
        assert TUESDAY[language] not in text and "Montag" not in text and "()" not in text, text
        assert not re.search(r"\s[.,)]", text), text  # nothing left dangling before punctuation
        for word in TIME_WORDS[language]:
            assert not re.search(rf"(?<!\w){re.escape(word)}\s+{re.escape(OVERDUE[language])}", text), text
        if language != "en":
            assert english_words(text) == [], text
    # In time, {promise} is the language's own "by <deadline>".
    in_time = render_acknowledgement(
        with_promise,
        author="@ana",
        owner=None,
        team=team,
        due_at=DUE,
        timezone=tz,
        now=NOW,
        language=language,
    )
    assert in_time.endswith(PROMISE[language].format(due=local_due_label(DUE, tz, language)) + "."), in_time
    if language != "en":
        assert english_words(in_time) == [], in_time


def test_overdue_wording_examples_read_naturally() -> None:
    policy = load_policy(EXAMPLE)
    team = Team(name="t", channel="#t", experts=(), calendar="c", display_name="Acme")
    common = {
        "author": "@ana",
        "owner": policy.experts["carla"],
        "team": team,
        "due_at": NOW,
        "timezone": ZoneInfo("Europe/Berlin"),
        "now": OVERDUE_NOW,
    }
    default = policy.acknowledgements["default"]
    assert render_acknowledgement(default["de"], language="de", **common).endswith(  # type: ignore[arg-type]
        "aus unserem Team Acme antwortet so bald wie möglich."
    )
    assert render_acknowledgement(default["en"], language="en", **common).endswith(  # type: ignore[arg-type]
        "from our Acme team will answer as soon as possible."
    )
    # An operator's own wording still wins, in every language.
    assert "sofort" in render_acknowledgement(
        default["de"],
        language="de",
        overdue_wording="sofort",
        **common,  # type: ignore[arg-type]
    )
