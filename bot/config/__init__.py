"""Load and validate ``replyclock.toml``: the policy file.

`load_policy` reads the file with `tomllib`, checks *everything* and either returns a
`bot.core.policy.Policy` or raises `ConfigError` listing every problem it found, each one
naming the file, the line, the dotted key and what was expected::

    replyclock.toml:14: teams.billing.calendar: unknown calendar 'eu-ofice' (known: eu-office, us-office)

`replyclock check` runs the same validation without starting anything and prints `summarize`.

Schema
======

Durations are strings of ``<number><unit>`` parts with units ``w d h m s``: ``"24h"``,
``"1h30m"``, ``"2d"``, ``"90s"``. Dates are TOML dates (``2026-12-24``) or strings
(``"2026-12-24"``). Names of calendars, experts, teams and accounts are the table keys below
and are how other sections refer to them.

Working hours (``hours``, used by calendars and experts) is a table from days to arrays of
open periods. Days are ``mon tue wed thu fri sat sun`` or a forward range such as
``mon-fri``; a day not listed is closed. A period is ``"HH:MM-HH:MM"`` in local time, the
end may be ``"24:00"``, and the periods of one day must not overlap::

    hours = { mon-fri = ["09:00-12:30", "13:30-17:00"], sat = ["10:00-14:00"] }

Public holidays (``holidays``, for calendars and experts) come from the `holidays` package::

    holidays = { country = "DE", subdivision = "BE" }   # subdivision is optional

``[settings]`` (optional)
    ``conversation_gap``  duration, default ``"24h"``: a post by the same author on the same
    account within this gap continues their open conversation.
    ``default_team``      team for posts that no routing rule matches (default: the first team).
    ``admin_channel``     Slack channel for operational notices (``"#replyclock-admin"``).
    ``ack_greeting``      default: the template language's word (``"there"``, ``"dir"``...): what ``{author}`` becomes when the platform does not
                          verify handles (webhook, feed); a customer-typed name is never used.
    ``ack_overdue_wording`` default: the template language's own (``"as soon as possible"``,
                          ``"so bald wie möglich"``...): replaces the first time phrase (``{promise}``,
                          or ``{due}``/``{due_in}`` with the words before them) in an acknowledgement
                          of a post that arrives already overdue; the other time phrases go.
    ``cross_team_actions`` boolean, default false: let any expert act on any team's conversation
                          (otherwise only its team, its manager and its on-call).
    ``retention_outbox``  duration or ``"off"``, default ``"30d"``: sent outbox rows are deleted after it.
    ``retention_events``  default ``"365d"``: events of conversations closed or answered that long ago.
    ``retention_text``    default ``"180d"``: customer text (and names) of settled conversations is
                          blanked after it; figures (times, teams, counts) stay.

``[calendars.<name>]``
    ``timezone``  (required) IANA time zone such as ``"Europe/Berlin"``.
    ``hours``     (required) working hours, as above.
    ``holidays``  public holidays, as above.
    ``closed``    array of extra closed dates.
    ``overrides`` table from date to the periods open that day instead of the usual
                  ones (``[]`` = closed): ``{ "2026-12-31" = ["09:00-12:00"] }``.
    ``weekend``   array of days (names or ranges) that are the weekend, default
                  ``["sat", "sun"]``, whatever the open hours; ``[]`` for none. Posts arriving
                  on a weekend day, a public holiday or a closed date get
                  ``weekend_first_response``.

``[experts.<id>]``
    ``name``       (required) full name; the first word is used in acknowledgements.
    ``slack_id``   (required) Slack member id, starting with ``U`` or ``W``.
    ``timezone``   (required) the expert's own IANA time zone.
    ``hours``      working hours in that zone, default ``mon-fri 09:00-17:00``.
    ``holidays``   the expert's public holidays.
    ``topics``     array of topics the expert prefers (routing rules can set topics).
    ``capacity``   integer >= 1, default 10: open conversations before others are preferred.
    ``away_until`` date; not assigned anything before it.
    ``email``      optional e-mail address.

``[teams.<name>]``
    ``channel``      (required) Slack channel, ``"#care"`` or a channel id ``"C0123ABCD"``.
    ``experts``      (required) array of expert ids.
    ``calendar``     (required) name of a calendar.
    ``on_call``      expert id used when nobody in the team is on duty.
    ``manager``      expert id (managers are listed under ``[experts]`` too).
    ``language``     language code for acknowledgements, default ``"en"``.
    ``display_name`` name shown in Slack, default the team's key.
    ``digest``       when the weekly digest is posted to the channel: ``"<day> HH:MM"`` in the
                     team calendar's time zone (a day as in working hours, a 24-hour time),
                     default ``"mon 09:00"``; ``"off"`` for no digest. It reports the last
                     completed ISO week (Monday to Sunday), on that day of the week after.
    ``follow_the_sun`` boolean, default false: when an owner's working hours end before the
                     deadline of an open conversation, hand it to the next expert on duty (with a
                     handover note in the card's thread).
    ``forecast_ack``        boolean, default false: acknowledgements promise the forecast answer
                            time (never later than the deadline) instead of the deadline.
    ``at_risk``             boolean, default false: tell owner and team when the simulated chance
                            that an open conversation misses its deadline reaches the calibrated
                            cut (bot.sim.forecast), before the first warning.
    ``forecast_percentile`` integer 50-99, default 80: the percentile of the forecast used.

``[[policies]]`` (at least one; the first that matches a conversation applies)
    ``name``                   (required, unique)
    ``clock``                  ``"wall"`` (default) or ``"business"`` (counts only the
                               calendar's open hours).
    ``calendar``               required for a business clock, and for a wall clock with
                               ``weekend_first_response`` (to tell working days).
    ``first_response``         (required) duration to the first human answer.
    ``next_response``          duration to answer a customer's further post.
    ``weekend_first_response`` wall clock only: target for posts arriving (in the calendar's
                               zone) on one of its ``weekend`` days, a public holiday or a
                               closed date (the classic "24 hours, 48 at weekends").
    ``warn_at``                array of fractions in (0, 1) of the target at which to warn,
                               default ``[0.75]``; ``[]`` for none.
    ``nag_every``              duration between reminders once overdue, default ``"1h"``.
    ``claim_within``           offer the conversation to the next expert if unclaimed by then.
    ``reassign_if_silent``     hand a claimed conversation to the next expert (releasing the
                               claim) when its owner neither answered nor acted for this long.
    ``resolution``             duration to resolution (staff close it after an answer), on the
                               policy's clock; paused while waiting on the customer.
    ``close_after_silence``    close a conversation waiting on the customer after this silence.
    ``acknowledge``            boolean, default false: send the auto-acknowledgement.
    ``escalation``             array of ``{ after = <duration past the deadline>, notify =
                               "owner" | "team_channel" | "manager" | "on_call" }`` in order.
    ``match``                  ``{ teams = [...], accounts = [...], priorities = [...] }``;
                               every list given must admit the conversation. The LAST policy
                               must have no ``match`` so that every conversation gets one.

``[[routing]]`` (ordered; the first rule that matches a post decides team and priority)
    ``name``      rule name, default ``rule-<n>``.
    ``team``      (required) team name.
    ``priority``  ``"low" | "normal" (default) | "high" | "urgent"``.
    Conditions (all given ones must match; a rule with none matches every post):
    ``accounts`` (account names), ``keywords`` (any of them, as whole words or phrases,
    ignoring case), ``regex`` (a Python regular expression found anywhere in the text, ignoring
    case), ``authors`` (ids or handles), ``languages`` (language codes; ``"pt"`` admits
    ``"pt-BR"``).
    ``topics``    topics given to the conversation, used to pick an expert by topic.

``[authors]`` (optional)
    ``vip``    handles or ids whose posts are urgent, whatever the routing rule says.
    ``ignore`` handles whose posts are ignored (bots, spam).

``[accounts.<name>]``
    ``kind``          (required) connector kind: ``"x"``, ``"mastodon"``, ``"feed"``,
                      ``"webhook"``, ``"email"``, ``"bluesky"`` or one provided by a plug-in.
    ``own_ids``       our own handles/ids on that account (their posts answer conversations).
    ``poll_interval`` duration, default ``"60s"``.
    ``can_reply``     boolean, default true.
    Any other key goes to the connector, which checks it when it starts: e.g. ``user_id``
    and ``search`` (x), ``api_base_url`` (mastodon), ``url`` (feed), ``secret_env`` and
    ``reply_url`` (webhook), ``address`` and ``imap_host`` (email), ``handle`` (bluesky).
    ``replyclock check`` also checks the email and bluesky settings and their secrets.
    Credentials never go here: connectors read them from the environment.

``[acknowledgements.<team name or "default">]``
    Language code to template, e.g. ``en = "Thanks {author}! {owner_first_name} from our
    {team} team will answer within {due_in}."``. Placeholders: ``{author}`` (the customer's
    handle), ``{owner}`` and ``{owner_first_name}`` (the assigned expert), ``{team}`` (its
    display name), ``{due}`` (the deadline, e.g. ``Dienstag 14:00 MEZ``), ``{due_in}`` (the time
    left, e.g. ``3 Stunden und 20 Minuten``), both formatted by Babel in the template's language,
    ``{promise}`` (``bis Dienstag 14:00 MEZ``, or overdue ``so bald wie möglich``);
    write ``{{`` and ``}}`` for literal braces. The template is looked up in the team's table,
    then ``default``, in the post's language (``pt-BR``, then ``pt``), then the team's, then ``en``.

Checks across sections
    Every name used must be defined (calendars, experts, teams, accounts); a policy or routing
    rule after one that matches everything can never apply; an escalation step that notifies
    ``manager`` or ``on_call`` needs every team the policy covers to have one; a policy with
    ``acknowledge = true`` needs a template for each team it covers; the ``topics`` of a routing
    rule must be listed by an expert of its team; Slack ids are unique; no author is both
    ``vip`` and ``ignore``.
"""

from __future__ import annotations

from bot.config.helpers import PLACEHOLDERS
from bot.config.loader import load_policy, parse_policy
from bot.config.locator import KeyLocator
from bot.config.problems import ConfigError, ConfigProblem, KeyPath, render_key
from bot.config.summary import summarize
from bot.config.validator import AccountCheck

__all__ = [
    "PLACEHOLDERS",
    "AccountCheck",
    "ConfigError",
    "ConfigProblem",
    "KeyLocator",
    "KeyPath",
    "load_policy",
    "parse_policy",
    "render_key",
    "summarize",
]
