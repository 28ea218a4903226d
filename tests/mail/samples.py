"""Sample messages as common mail clients and servers write them (bytes as they arrive over IMAP).

Each function returns the raw RFC 5322 message; the ids and addresses are parameters so that
the tests can build a reply chain on the Message-IDs replyclock itself sent.
"""

from __future__ import annotations

import base64

US = "support@acme.test"


def crlf(text: str) -> bytes:
    return text.lstrip("\n").replace("\n", "\r\n").encode("utf-8")


def plain(date: str = "Mon, 23 Nov 2026 07:50:00 +0000") -> bytes:
    """Thunderbird, a new question in plain text with a signature."""
    return crlf(f"""
Message-ID: <0b1e2c3d-plain@example.com>
Date: {date}
MIME-Version: 1.0
User-Agent: Mozilla Thunderbird
Content-Language: en-US
To: Acme Support <{US}>
From: Jane Doe <jane@example.com>
Subject: My order #4411 never arrived
Content-Type: text/plain; charset=UTF-8; format=flowed
Content-Transfer-Encoding: 8bit

Hello,

I ordered a kettle two weeks ago and it never came. Can you check?

--=20
Jane Doe
+49 30 1234567
""").replace(b"--=20", b"-- ")


def html_only(date: str = "Mon, 23 Nov 2026 07:51:00 +0000") -> bytes:
    """A web mailer's HTML-only message with a script and a tracking pixel."""
    return crlf(f"""
Message-ID: <CAHtml-only-77@mail.example.org>
Date: {date}
From: "Bob Stone" <bob@example.org>
To: {US}
Subject: =?UTF-8?Q?R=C3=BCckerstattung_bitte?=
MIME-Version: 1.0
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

<html><head><style>p {{ color: red }}</style><script>alert('x')</script></head>
<body><p>Hi team,</p><p>I was charged twice for <b>invoice 9921</b>.<br>Please fix it.</p>
<img src=3D"https://tracker.example.net/pixel.gif" width=3D"1" height=3D"1"></body></html>
""")


def with_attachments(date: str = "Mon, 23 Nov 2026 07:52:00 +0000") -> bytes:
    """Apple Mail, multipart/mixed with a text part, a PDF and an image."""
    pdf = base64.encodebytes(b"%PDF-1.4\n" + b"0" * 3000).decode()
    png = base64.encodebytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 500).decode()
    return crlf(f"""
From: Carla Mendes <carla@example.net>
Content-Type: multipart/mixed;
\tboundary="Apple-Mail=_6A1F"
Mime-Version: 1.0 (Mac OS X Mail 16.0)
Subject: Broken lid, photos attached
Message-Id: <6A1F0C11-AAAA-4B4B@example.net>
Date: {date}
To: {US}

--Apple-Mail=_6A1F
Content-Transfer-Encoding: 7bit
Content-Type: text/plain;
\tcharset=us-ascii

The lid of my kettle broke on the first day. Photo and receipt attached.

--Apple-Mail=_6A1F
Content-Disposition: attachment;
\tfilename=receipt.pdf
Content-Type: application/pdf;
\tname="receipt.pdf"
Content-Transfer-Encoding: base64

{pdf}
--Apple-Mail=_6A1F
Content-Disposition: inline;
\tfilename=lid.png
Content-Type: image/png;
\tname="lid.png"
Content-Transfer-Encoding: base64

{png}
--Apple-Mail=_6A1F--
""")


def thunderbird_reply(
    in_reply_to: str, references: str, date: str = "Mon, 23 Nov 2026 09:30:00 +0000"
) -> bytes:
    """Jane answers our acknowledgement in Thunderbird: bottom of the quote kept, '>' quoted history."""
    return crlf(f"""
Message-ID: <5c1d9a2e-reply@example.com>
Date: {date}
MIME-Version: 1.0
User-Agent: Mozilla Thunderbird
Subject: Re: My order #4411 never arrived
To: Acme Support <{US}>
References: {references}
From: Jane Doe <jane@example.com>
In-Reply-To: {in_reply_to}
Content-Type: text/plain; charset=UTF-8; format=flowed
Content-Transfer-Encoding: 8bit

The tracking number is DHL 00340434161094042557.

On 23.11.26 08:51, Acme Support wrote:
> Thanks Jane Doe! Sam from our Customer Care team will get back to you.
>
> On Mon, 23 Nov 2026 07:50, Jane Doe wrote:
>> I ordered a kettle two weeks ago and it never came.
""")


def outlook_reply_without_references(date: str = "Mon, 23 Nov 2026 10:05:00 +0000") -> bytes:
    """Bob answers from Outlook, which (behind some gateways) loses In-Reply-To and References."""
    return crlf(f"""
Message-ID: <AM6PR0102MB0001-outlook@eurprd01.prod.outlook.com>
Date: {date}
From: Bob Stone <bob@example.org>
To: "support@acme.test" <{US}>
Subject: AW: Rueckerstattung bitte
Thread-Topic: Rueckerstattung bitte
Content-Language: de-DE
MIME-Version: 1.0
Content-Type: text/plain; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

Noch eine Frage: bekomme ich das Geld zur=FCck auf die Karte?

________________________________
Von: Acme Support <{US}>
Gesendet: Montag, 23. November 2026 08:52
An: Bob Stone <bob@example.org>
Betreff: Re: R=FCckerstattung bitte

Thanks Bob Stone! We will get back to you.
""")


def out_of_office(in_reply_to: str, date: str = "Mon, 23 Nov 2026 08:53:00 +0000") -> bytes:
    """Exchange's automatic reply to our acknowledgement (RFC 3834 Auto-Submitted)."""
    return crlf(f"""
Message-ID: <oof-1234@example.net>
Date: {date}
From: Carla Mendes <carla@example.net>
To: {US}
Subject: Automatic reply: Broken lid, photos attached
In-Reply-To: {in_reply_to}
Auto-Submitted: auto-replied
X-Auto-Response-Suppress: All
Content-Type: text/plain; charset="us-ascii"

I am out of the office until 30 November.
""")


def vacation_without_references(date: str = "Mon, 23 Nov 2026 07:55:00 +0000") -> bytes:
    """A vacation responder answering someone's mail to us, with Precedence: bulk only."""
    return crlf(f"""
Message-ID: <vacation-99@example.info>
Date: {date}
From: Dana <dana@example.info>
To: {US}
Subject: On holiday
Precedence: bulk
Content-Type: text/plain; charset="us-ascii"

I am on holiday and will read your mail later.
""")


def bounce(original_id: str, date: str = "Mon, 23 Nov 2026 08:54:00 +0000") -> bytes:
    """Postfix's delivery status notification for one of our messages (RFC 3464)."""
    return crlf(f"""
Return-Path: <>
Message-ID: <20261123085400.B0F1@mx.acme.test>
Date: {date}
From: MAILER-DAEMON@mx.acme.test (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {US}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B0F1.1763887240/mx.acme.test"

This is a MIME-encapsulated message.

--B0F1.1763887240/mx.acme.test
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<gone@example.com>: host mx.example.com said: 550 5.1.1 User unknown

--B0F1.1763887240/mx.acme.test
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.acme.test
Final-Recipient: rfc822; gone@example.com
Action: failed
Status: 5.1.1

--B0F1.1763887240/mx.acme.test
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: Acme Support <{US}>
To: gone@example.com
Subject: Re: Where is my parcel
Message-ID: {original_id}

--B0F1.1763887240/mx.acme.test--
""")


def list_post(date: str = "Mon, 23 Nov 2026 07:56:00 +0000") -> bytes:
    """A mailing-list post (Mailman 3) that reached our address."""
    return crlf(f"""
Message-ID: <list-post-5@lists.example.org>
Date: {date}
From: Eve Writer <eve@example.org>
To: users@lists.example.org
Subject: [users] Anyone else seeing slow kettles?
List-Id: Users of kettles <users.lists.example.org>
List-Unsubscribe: <mailto:users-leave@lists.example.org>
Precedence: list
Content-Type: text/plain; charset="us-ascii"

Mine takes ages to boil.
""")


def broken(date_header: bool = False) -> bytes:
    """No From, no Date, no Message-ID, an unknown charset and a boundary that never closes."""
    return crlf("""
Subject: =?x-unknown-charset?B?SGVsbG8=?=
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="zzz"

--zzz
Content-Type: text/plain; charset="x-klingon-42"

qapla' my kettle is broken
--zzz
Content-Type: text/html; charset=utf-8
""")


def large(size: int, date: str = "Mon, 23 Nov 2026 07:57:00 +0000") -> bytes:
    """A message with a big attachment, `size` bytes or more."""
    blob = base64.encodebytes(b"\x00" * (size * 3 // 4 + 1)).decode()
    return crlf(f"""
Message-ID: <big-1@example.com>
Date: {date}
From: Frank Big <frank@example.com>
To: {US}
Subject: Video of the problem
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b1"

--b1
Content-Type: text/plain; charset=utf-8

See the video.
--b1
Content-Type: video/mp4; name="kettle.mp4"
Content-Disposition: attachment; filename="kettle.mp4"
Content-Transfer-Encoding: base64

{blob}
--b1--
""")


def gmail_reply(in_reply_to: str, references: str, date: str = "Mon, 23 Nov 2026 09:40:00 +0000") -> bytes:
    """Gmail's reply: multipart/alternative, the attribution line wrapped, the quote in both parts."""
    return crlf(f"""
MIME-Version: 1.0
References: {references}
In-Reply-To: {in_reply_to}
From: Jane Doe <jane.doe@gmail.example>
Date: {date}
Message-ID: <CAF=gmail-reply-1@mail.gmail.example>
Subject: Re: My order #4411 never arrived
To: Acme Support <{US}>
Content-Type: multipart/alternative; boundary="000000000000a1b2c3"

--000000000000a1b2c3
Content-Type: text/plain; charset="UTF-8"

Thanks, it arrived today!

Jane

On Mon, 23 Nov 2026 at 09:51, Acme Support <{US}>
wrote:

> Thanks Jane Doe! Sam from our Customer Care team will get back to you.
>

--000000000000a1b2c3
Content-Type: text/html; charset="UTF-8"

<div dir=3D"ltr">Thanks, it arrived today!<div><br></div><div>Jane</div></div><br><div class=3D"gmail_quote"><div dir=3D"ltr" class=3D"gmail_attr">On Mon, 23 Nov 2026 at 09:51, Acme Support &lt;{US}&gt; wrote:<br></div><blockquote class=3D"gmail_quote">Thanks Jane Doe!</blockquote></div>

--000000000000a1b2c3--
""")
