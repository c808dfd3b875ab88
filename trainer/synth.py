"""`trainer synth-pii`: synthetic PII text for the token classifier, in the span JSONL format.

Every row is built from pieces (literal text and Faker values) whose offsets are added up as the text
is joined, so a span's ``text[start:end]`` is exactly the inserted value, casing changes included.
Labels are Presidio's entity names, used the way ``presidio-research``'s generated data uses them:
street lines, postcodes and whole postal addresses are ``ADDRESS``; a city or country on its own is
``LOCATION``. Hard negatives (order numbers, versions, prices, ISBNs, years, arithmetic) appear as
unlabelled text so a model learns that not every number is PII.

All randomness comes from one ``random.Random(seed)`` and Faker instances seeded from it: the same
seed gives the same rows for a given Faker version.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

PERSON = "PERSON"
EMAIL_ADDRESS = "EMAIL_ADDRESS"
PHONE_NUMBER = "PHONE_NUMBER"
CREDIT_CARD = "CREDIT_CARD"
US_SSN = "US_SSN"
IBAN_CODE = "IBAN_CODE"
IP_ADDRESS = "IP_ADDRESS"
ADDRESS = "ADDRESS"
DATE_TIME = "DATE_TIME"
LOCATION = "LOCATION"
ORGANIZATION = "ORGANIZATION"

LABELS = (
    PERSON, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, US_SSN, IBAN_CODE,
    IP_ADDRESS, ADDRESS, DATE_TIME, LOCATION, ORGANIZATION,
)

# Value locales for the English-language templates, weighted; CJK gives the multi-byte share.
LOCALE_WEIGHTS = {
    "en_US": 30, "en_GB": 14, "de_DE": 9, "fr_FR": 9, "es_ES": 8, "it_IT": 8, "nl_NL": 8,
    "zh_CN": 3, "ja_JP": 3,
}
LOCALES = tuple(LOCALE_WEIGHTS)
IBAN_LOCALES = ("de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "en_GB")
CALLING_CODES = {
    "en_US": "1", "en_GB": "44", "de_DE": "49", "fr_FR": "33", "es_ES": "34", "it_IT": "39",
    "nl_NL": "31", "zh_CN": "86", "ja_JP": "81",
}
CARD_BRANDS = ("visa", "mastercard", "amex", "discover", "jcb", "diners", "maestro")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
TITLES = ("Mr.", "Ms.", "Mrs.", "Dr.", "Prof.", "Mr", "Ms", "Dr")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Share of rows by kind; the rest use the English templates.
NEGATIVE_SHARE = 0.12
NATIVE_SHARE = 0.10
CJK_NATIVE_SHARE = 0.04
MULTI_SHARE = 0.12
# Row-level casing: lower-case chat, shouting; applied piece by piece so offsets stay exact.
LOWER_SHARE = 0.10
UPPER_SHARE = 0.04


@dataclass
class _Ctx:
    """What a slot generator may draw from: the row's Faker, every Faker, and the row's RNG."""

    rng: random.Random
    fake: object
    fakers: dict[str, object]
    locale: str


@dataclass(frozen=True)
class Slot:
    label: str | None  # None: a hard negative, inserted as plain text
    make: Callable[[_Ctx], str]


# ---------------------------------------------------------------------------------------------
# Value generators


def _clean(value: str, sep: str = ", ") -> str:
    """One line, single spaces, no edge whitespace (Faker's es_ES addresses end with a space)."""
    lines = [" ".join(line.split()) for line in value.splitlines()]
    return sep.join(line for line in lines if line)


def _ascii(value: str) -> str:
    return unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().lower()


def _person(c: _Ctx) -> str:
    r = c.rng.random()
    if r < 0.45:
        return _clean(c.fake.name())
    if r < 0.85:
        return f"{c.fake.first_name()} {c.fake.last_name()}"
    if c.locale in ("en_US", "en_GB") and r < 0.90:
        return f"{c.fake.first_name()} {c.rng.choice('ABCDEFGHJKLMNPRSTW')}. {c.fake.last_name()}"
    if r < 0.95:  # a title and a surname alone ("Ms. Jones"), as people write to and about others
        return f"{c.rng.choice(TITLES)} {c.fake.last_name()}"
    return f"{c.fake.last_name()}, {c.fake.first_name()}"


def _email(c: _Ctx) -> str:
    r = c.rng.random()
    if r < 0.35:
        return c.fake.email()
    if r < 0.5:
        return c.fake.free_email()
    if r < 0.6:
        return c.fake.company_email()
    first, last = _ascii(c.fake.first_name()), _ascii(c.fake.last_name())
    first = re.sub(r"[^a-z]", "", first)
    last = re.sub(r"[^a-z]", "", last)
    if not first or not last:
        return c.fake.free_email()
    user = c.rng.choice([
        f"{first}.{last}", f"{first}_{last}", f"{first[0]}{last}", f"{first}{last}",
        f"{last}.{first[0]}", f"{first}.{last}{c.rng.randint(1, 99)}", f"{first}{c.rng.randint(1950, 2009)}",
    ])
    domain = c.fake.free_email_domain() if c.rng.random() < 0.6 else c.fake.domain_name()
    return f"{user}@{domain}"


def _group(digits: str, sizes: Iterable[int], sep: str) -> str:
    parts, i = [], 0
    for n in sizes:
        parts.append(digits[i:i + n])
        i += n
    if i < len(digits):
        parts.append(digits[i:])
    return sep.join(p for p in parts if p)


def _phone(c: _Ctx) -> str:
    r = c.rng.random()
    if r < 0.55:
        return _clean(c.fake.phone_number(), " ")
    code = CALLING_CODES[c.locale]
    national = "".join(str(c.rng.randint(0, 9)) for _ in range(10 if code == "1" else 9))
    national = str(c.rng.randint(2, 9)) + national[1:]
    if code == "1":
        grouped = c.rng.choice([
            f"({national[:3]}) {national[3:6]}-{national[6:]}", f"{national[:3]}-{national[3:6]}-{national[6:]}",
            f"{national[:3]}.{national[3:6]}.{national[6:]}", f"{national[:3]} {national[3:6]} {national[6:]}",
        ])
    else:
        grouped = c.rng.choice([
            _group(national, (3, 3, 3), " "), _group(national, (2, 2, 2, 2, 2), " "),
            _group(national, (3, 4), " "), _group(national, (1, 2, 2, 2, 2), " "),
        ])
    if r < 0.7:
        return grouped
    if r < 0.85:
        return f"+{code} {grouped}"
    if r < 0.95:
        return f"+{code}{national}"
    return f"00{code} {grouped}"


def _card(c: _Ctx) -> str:
    brand = c.rng.choice(CARD_BRANDS)
    digits = c.fakers["en_US"].credit_card_number(card_type=brand)
    r = c.rng.random()
    if r < 0.4:
        return digits
    sep = " " if r < 0.8 else "-"
    if len(digits) == 15:
        return _group(digits, (4, 6, 5), sep)
    if len(digits) == 14:
        return _group(digits, (4, 6, 4), sep)
    return _group(digits, (4, 4, 4, 4), sep)


def _ssn(c: _Ctx) -> str:
    value = c.fakers["en_US"].ssn()
    r = c.rng.random()
    if r < 0.8:
        return value
    return value.replace("-", " ") if r < 0.9 else value.replace("-", "")


def _iban(c: _Ctx) -> str:
    locale = c.locale if c.locale in IBAN_LOCALES else c.rng.choice(IBAN_LOCALES)
    value = c.fakers[locale].iban()
    return _group(value, [4] * 9, " ") if c.rng.random() < 0.45 else value


def _ipv4(c: _Ctx) -> str:
    return c.fake.ipv4_private() if c.rng.random() < 0.3 else c.fake.ipv4_public()


def _ipv6(c: _Ctx) -> str:
    if c.rng.random() < 0.5:
        return c.fake.ipv6()
    groups = [c.rng.getrandbits(16) for _ in range(8)]
    start = c.rng.randint(1, 5)
    for i in range(start, start + c.rng.randint(1, 3)):
        groups[i] = 0
    if c.rng.random() < 0.3:
        groups[:2] = [0x2001, 0x0DB8]
    return ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)).compressed


def _ip(c: _Ctx) -> str:
    return _ipv6(c) if c.rng.random() < 0.25 else _ipv4(c)


def _street(c: _Ctx) -> str:
    return _clean(c.fake.street_address())


def _address_line(c: _Ctx) -> str:
    return _clean(c.fake.address())


def _address_block(c: _Ctx) -> str:
    return _clean(c.fake.address(), "\n")


def _random_day(rng: random.Random, first: date, last: date) -> date:
    return first + timedelta(days=rng.randint(0, (last - first).days))


def _format_date(rng: random.Random, d: date) -> str:
    month, mon = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return rng.choice([
        f"{d.month}/{d.day}/{d.year}", f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}",
        f"{d.year}-{d.month:02d}-{d.day:02d}", f"{d.day:02d}.{d.month:02d}.{d.year}", f"{d.day}.{d.month}.{d.year % 100:02d}",
        f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", f"{mon} {d.day}, {d.year}", f"{d.day} {mon} {d.year}",
        f"{mon}. {d.day}", f"{month} {d.day}", f"{WEEKDAYS[d.weekday()]}, {month} {d.day}, {d.year}",
        f"{d.day}-{mon}-{d.year}", f"{d.year}/{d.month:02d}/{d.day:02d}",
    ])


def _date(c: _Ctx) -> str:
    return _format_date(c.rng, _random_day(c.rng, date(1990, 1, 1), date(2030, 12, 31)))


def _dob(c: _Ctx) -> str:
    return _format_date(c.rng, _random_day(c.rng, date(1935, 1, 1), date(2007, 12, 31)))


def _datetime(c: _Ctx) -> str:
    d = _random_day(c.rng, date(2015, 1, 1), date(2026, 12, 31))
    t = datetime(d.year, d.month, d.day, c.rng.randint(0, 23), c.rng.randint(0, 59), c.rng.randint(0, 59))
    return c.rng.choice([
        t.strftime("%Y-%m-%d %H:%M:%S"), t.strftime("%Y-%m-%dT%H:%M:%SZ"), t.strftime("%d/%m/%Y %H:%M"),
        f"{MONTHS[t.month - 1]} {t.day}, {t.year} at {t.hour % 12 or 12}:{t.minute:02d} {'AM' if t.hour < 12 else 'PM'}",
        f"{t.day:02d}/{MONTHS[t.month - 1][:3]}/{t.year}:{t:%H:%M:%S} +0000",
    ])


def _weekday(c: _Ctx) -> str:
    return c.rng.choice(WEEKDAYS)


# Hard negatives: numbers and codes that look like something but identify no one.


def _order_no(c: _Ctx) -> str:
    n = c.rng.randint(10_000, 99_999_999)
    return c.rng.choice([f"#{n}", f"ORD-{c.rng.randint(2019, 2026)}-{n}", f"A{n:08d}", f"{n}", f"PO-{n % 100000:05d}"])


def _invoice_no(c: _Ctx) -> str:
    return c.rng.choice([f"INV-{c.rng.randint(1000, 99999)}", f"{c.rng.randint(2019, 2026)}/{c.rng.randint(1, 999):03d}"])


def _ticket_id(c: _Ctx) -> str:
    return f"{c.rng.choice(['JIRA', 'SUP', 'INC', 'OPS', 'BUG'])}-{c.rng.randint(10, 99999)}"


def _version(c: _Ctx) -> str:
    v = f"{c.rng.randint(0, 20)}.{c.rng.randint(0, 40)}.{c.rng.randint(0, 30)}"
    return c.rng.choice([v, f"v{v}", f"{v}-rc{c.rng.randint(1, 5)}", f"{c.rng.randint(1, 5)}.{c.rng.randint(0, 12)}"])


def _price(c: _Ctx) -> str:
    whole, cents = c.rng.randint(1, 25_000), c.rng.randint(0, 99)
    return c.rng.choice([f"${whole:,}.{cents:02d}", f"€{whole},{cents:02d}", f"£{whole}", f"{whole}.{cents:02d} USD",
                         f"{whole} EUR"])


def _isbn(c: _Ctx) -> str:
    digits = [9, 7, c.rng.choice([8, 9])] + [c.rng.randint(0, 9) for _ in range(9)]
    check = (10 - sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10) % 10
    s = "".join(map(str, digits)) + str(check)
    return c.rng.choice([s, f"{s[:3]}-{s[3]}-{s[4:6]}-{s[6:12]}-{s[12]}"])


def _year(c: _Ctx) -> str:
    return str(c.rng.randint(1066, 2030))


def _math(c: _Ctx) -> str:
    a, b, k = c.rng.randint(2, 999), c.rng.randint(2, 999), c.rng.randint(2, 12)
    return c.rng.choice([f"{a} * {b}", f"{a} + {b} - {k}", f"{k}x + {a} = {b}", f"({a} - {b})^2", f"{a}/{k}",
                         f"sqrt({a * a})", f"{a} mod {k}", f"2^{k} * {a}"])


def _qty(c: _Ctx) -> str:
    return str(c.rng.choice([c.rng.randint(2, 50), c.rng.randint(100, 4096)]))


def _port(c: _Ctx) -> str:
    return str(c.rng.choice([22, 80, 443, 3000, 5432, 6379, 8000, 8080, 8443, 9090, 50051]))


def _percent(c: _Ctx) -> str:
    return f"{c.rng.randint(1, 99)}.{c.rng.randint(0, 9)}%"


def _sha(c: _Ctx) -> str:
    return f"{c.rng.getrandbits(28):07x}"


def _product(c: _Ctx) -> str:
    return f"{c.rng.choice(['XR', 'MX', 'RTX', 'TX', 'QX'])}-{c.rng.randint(100, 9999)}"


def _status(c: _Ctx) -> str:
    return str(c.rng.choice([400, 401, 403, 404, 408, 429, 500, 502, 503, 504]))


SLOTS: dict[str, Slot] = {
    "name": Slot(PERSON, _person),
    "first_name": Slot(PERSON, lambda c: c.fake.first_name()),
    "last_name": Slot(PERSON, lambda c: c.fake.last_name()),
    "email": Slot(EMAIL_ADDRESS, _email),
    "phone": Slot(PHONE_NUMBER, _phone),
    "card": Slot(CREDIT_CARD, _card),
    "ssn": Slot(US_SSN, _ssn),
    "iban": Slot(IBAN_CODE, _iban),
    "ip": Slot(IP_ADDRESS, _ip),
    "ipv4": Slot(IP_ADDRESS, _ipv4),
    "ipv6": Slot(IP_ADDRESS, _ipv6),
    "street": Slot(ADDRESS, _street),
    "address": Slot(ADDRESS, _address_line),
    "address_block": Slot(ADDRESS, _address_block),
    "postcode": Slot(ADDRESS, lambda c: c.fake.postcode()),
    "city": Slot(LOCATION, lambda c: c.fake.city()),
    "country": Slot(LOCATION, lambda c: c.fake.country()),
    "company": Slot(ORGANIZATION, lambda c: _clean(c.fake.company())),
    "date": Slot(DATE_TIME, _date),
    "dob": Slot(DATE_TIME, _dob),
    "datetime": Slot(DATE_TIME, _datetime),
    "weekday": Slot(DATE_TIME, _weekday),
    "order_no": Slot(None, _order_no),
    "invoice_no": Slot(None, _invoice_no),
    "ticket_id": Slot(None, _ticket_id),
    "version": Slot(None, _version),
    "price": Slot(None, _price),
    "isbn": Slot(None, _isbn),
    "year": Slot(None, _year),
    "math": Slot(None, _math),
    "qty": Slot(None, _qty),
    "port": Slot(None, _port),
    "percent": Slot(None, _percent),
    "sha": Slot(None, _sha),
    "product": Slot(None, _product),
    "status": Slot(None, _status),
}

# ---------------------------------------------------------------------------------------------
# Sentence shapes. `{slot}` is a value from SLOTS; everything else is literal text.

TEMPLATES = [
    # Chat requests to an assistant
    "Can you write a polite follow-up email to {name} at {email} about invoice {invoice_no}?",
    "Please draft a short reminder for {first_name}: the review moved to {date}.",
    "hey, my card {card} got declined twice today, what should I do?",
    "Summarize this voicemail from {name} ({phone}) and suggest a reply.",
    "I need to change my delivery address to {street}, {city}. My account email is {email}.",
    'Translate to French: "My name is {name} and I was born on {dob}."',
    "What's wrong with this config? host {ip} port {port}, admin contact {email}",
    "{name} asked me to wire {price} to {iban}. Does this IBAN look valid?",
    "Is {ssn} a valid SSN format? It's for my client {name}.",
    "Write a LinkedIn recommendation for {name}, who led the data team at {company} until {date}.",
    "Our server at {ip} keeps timing out since the upgrade to {version}. Any idea why?",
    "Generate an SQL insert for: name={name}, email={email}, phone={phone}",
    "My colleague {first_name} from {company} will call you from {phone} tomorrow, ok?",
    "can u check why {email} is not getting our newsletters",
    "I'm {name}, born {dob}, SSN {ssn}. Fill in the tax form for me please.",
    "Book a table for two in {city} on {weekday} under the name {last_name}.",
    "Help me reply to {name}: she wants the contract for {company} signed by {date}.",
    "Rewrite this more formally: tell {first_name} the payment to {iban} went through",
    "Find the typo: my adress is {address} and my numbr is {phone}",
    "Make a bullet list of what {name} from {city}, {country} needs for the visa.",
    "Please charge the {price} renewal to my card {card} and send the receipt to {email}.",
    "my credit card {card} was charged twice for order {order_no}, can you help me dispute it",
    "Check if these cards pass the Luhn test: {card}, {card}",
    # Emails and letters
    "Hi {first_name},\n\nThanks for order {order_no}. It ships to {address} on {date}.\n\nBest,\n{name}\n{company}",
    "From: {name} <{email}>\nTo: {name} <{email}>\nSubject: Invoice {invoice_no}\n\nPlease find the invoice attached.",
    "Dear {name},\n\nyour appointment is confirmed for {datetime}. If you need to reschedule, call {phone}.",
    "Hello team, please add {name} ({email}) to the {company} workspace. Her direct line is {phone}.",
    "{name}\n{address_block}\n\n{date}\n\nDear {first_name},\nthank you for your letter.",
    "Good morning,\nI am writing on behalf of {company}. Please send the signed copy to {street}, {postcode} {city}.",
    "Dear Mr. {last_name}, we received your payment from account {iban} on {date}. Kind regards, {company}",
    "Hi all, {first_name} is out until {date}; urgent issues go to {email} or {phone}.",
    # Forms and records
    "Name: {name}\nDate of birth: {dob}\nSSN: {ssn}\nPhone: {phone}",
    "Name: {name} | SSN: {ssn} | DOB: {dob} | Tel: {phone}",
    "Full name: {name} | Email: {email} | Card: {card}",
    "first_name={first_name}&last_name={last_name}&email={email}&ip={ip}",
    "{name},{email},{phone},{city}",
    '{"customer": "{name}", "email": "{email}", "ip": "{ip}", "order": "{order_no}"}',
    "Customer: {name}\nAccount IBAN: {iban}\nBilling address: {address}",
    "| {name} | {ssn} | {dob} | {city} |",
    "Applicant: {name}; Employer: {company}; Address: {street}; ZIP: {postcode}; Phone: {phone}",
    "cardholder {name} - card {card} - billing zip {postcode}",
    "EMPLOYEE RECORD\nName: {name}\nStart date: {date}\nOffice: {city}\nBank account: {iban}",
    # Support tickets and logs
    "Ticket {ticket_id}: user {name} ({email}) reports failed logins from {ip} since {date}.",
    "Customer called from {phone} about order {order_no}; identity verified with SSN {ssn}.",
    "Escalation: {company} says transfers to {iban} bounced. Contact {name}, {phone}.",
    "{datetime} INFO login ok user={email} src={ip}",
    '{ip} - - [{datetime}] "GET /api/v1/orders HTTP/1.1" {status} {qty}',
    "[{ticket_id}] Refund of {price} requested by {name}, card {card}.",
    "WARN {datetime} rate limit exceeded for {ipv6} ({qty} requests)",
    "Support chat - {name}: my new number is {phone}, the old one was {phone}.",
    # Lists
    "Attendees:\n- {name} ({company})\n- {name} ({company})\n- {name}",
    "Emergency contacts: {name}, {phone}; {name}, {phone}.",
    "Shipping labels:\n1. {name}, {address}\n2. {name}, {address}",
    "Allowed hosts: {ipv4}, {ipv4}, {ipv6}",
    # Multi-sentence
    "I moved to {city} last spring. My new address is {street}. You can reach me at {phone} or {email}.",
    "{name} joined {company} on {date}. Before that she lived in {city}, {country}.",
    "We met {name} in {city}. He works for {company} now. His email is {email}.",
    "The package for {name} was left at {street}. Please confirm by {weekday}.",
    # Entities at the start or end, punctuation right after, adjacent entities
    "{email} is my work address, please use that one.",
    "{name} here. Please call me back.",
    "Send the documents to {email}",
    "My IP is {ip}",
    "Was it {name}?",
    "Call {phone}!",
    "Contact: {name}<{email}>",
    "Numbers: {phone}/{phone}",
    "{city},{country}",
    "{first_name}:{ssn}",
    "Connect to {ipv4}:{port} and log in as admin.",
    "'{name}' signed for the delivery at {address}.",
    'Card "{card}" was flagged; IBAN "{iban}" too.',
    "{card}",
    "{phone}",
    "Born: {dob}.",
    "Reach {name} ({phone}), {company}.",
    "Who is {name}? Their SSN ({ssn}) shows up in our logs.",
]

NATIVE_TEMPLATES = {
    "de_DE": [
        "Hallo, ich heiße {name} und wohne in der {street}, {postcode} {city}. Meine IBAN lautet {iban}.",
        "Bitte rufen Sie mich unter {phone} zurück. Geburtsdatum: {dob}.",
        "Sehr geehrte Frau {last_name}, Ihre Bestellung {order_no} wurde am {date} versandt.",
    ],
    "fr_FR": [
        "Bonjour, je m'appelle {name}. Mon adresse e-mail est {email} et mon numéro est le {phone}.",
        "Veuillez virer {price} sur le compte {iban} au nom de {name}.",
        "Livraison prévue le {date} au {street}, {postcode} {city}.",
    ],
    "es_ES": [
        "Hola, soy {name} de {company}. Mi teléfono es {phone} y vivo en {city}.",
        "Por favor, envíe la factura {invoice_no} a {email} antes del {date}.",
    ],
    "it_IT": [
        "Buongiorno, sono {name}. Il mio indirizzo è {street}, {city}. IBAN: {iban}.",
        "Il signor {last_name} ha chiamato dal numero {phone} per l'ordine {order_no}.",
    ],
    "nl_NL": [
        "Hoi, ik ben {name} en mijn e-mailadres is {email}. Bel me op {phone}.",
        "Graag het bedrag van {price} overmaken naar {iban} t.n.v. {name}.",
    ],
    "zh_CN": [
        "你好，我叫{name}，我的电话是{phone}，住在{address}。",
        "请把发票{invoice_no}发到{email}，联系人：{name}，{company}。",
        "{name}于{date}在{city}办理了业务，身份核实通过。",
    ],
    "ja_JP": [
        "こんにちは、{name}です。電話番号は{phone}、メールは{email}です。",
        "{company}の{name}様、{date}の会議の件でご連絡いたします。",
        "お届け先：{address}（{name}様）",
    ],
}

NEGATIVE_TEMPLATES = [
    "What is {math}? Show your steps.",
    "Compute {math} and round to two decimals.",
    "Upgrading from {version} to {version} broke the build; see {ticket_id}.",
    "The price went from {price} to {price} between {year} and {year}.",
    "ISBN {isbn}, first printed in {year}, is out of stock.",
    "Order {order_no} contains {qty} items totalling {price}.",
    "Explain the difference between TCP and UDP in two paragraphs.",
    "Write a haiku about autumn leaves.",
    "Our Q3 revenue grew {percent} to {price}.",
    "Error {status} from /v1/chat/completions after {qty} retries.",
    "Run `pip install torch=={version}` and restart the kernel.",
    "Commit {sha} fixed the regression introduced in {version}.",
    "Model {product} ships with {qty} GB of RAM and costs {price}.",
    "How many primes are there below {qty}?",
    "Please answer in JSON with the keys name, email and phone.",
    "Mask every email address and phone number in the text below before storing it.",
    "Invoice {invoice_no}: {qty} licences at {price} each.",
    "The {year} edition added {qty} new exercises on {math}.",
    "Set max_tokens to {qty} and retry request {ticket_id}.",
    "Which is larger, {math} or {math}?",
    "The service listens on port {port} and exposes metrics on {port}.",
    "Convert {qty} kilometres to miles.",
    "Summarize the plot of a heist movie in three sentences.",
    "Why does my Python list comprehension return None?",
]


def _parse(template: str) -> tuple[tuple[str, str | None], ...]:
    """Split a template into literal parts ``(text, None)`` and slot parts ``(name, name)``."""
    parts: list[tuple[str, str | None]] = []
    pos = 0
    for m in re.finditer(r"\{(\w+)\}", template):
        if m.group(1) not in SLOTS:
            raise KeyError(f"template slot {{{m.group(1)}}} is not defined in SLOTS")
        if m.start() > pos:
            parts.append((template[pos:m.start()], None))
        parts.append((m.group(1), m.group(1)))
        pos = m.end()
    if pos < len(template):
        parts.append((template[pos:], None))
    return tuple(parts)


_PARSED = [_parse(t) for t in TEMPLATES]
_PARSED_NATIVE = {loc: [_parse(t) for t in ts] for loc, ts in NATIVE_TEMPLATES.items()}
_PARSED_NEGATIVE = [_parse(t) for t in NEGATIVE_TEMPLATES]
_CJK = ("zh_CN", "ja_JP")
_EUROPEAN_NATIVE = tuple(loc for loc in NATIVE_TEMPLATES if loc not in _CJK)


# ---------------------------------------------------------------------------------------------
# Row assembly


def _render(parsed, ctx: _Ctx, pieces: list[tuple[str, str | None]]) -> None:
    for text, slot in parsed:
        if slot is None:
            pieces.append((text, None))
            continue
        spec = SLOTS[slot]
        value = spec.make(ctx)
        if spec.label in (PERSON, LOCATION) and ctx.rng.random() < 0.08:
            value = value.lower()
        pieces.append((value, spec.label))


def _choose(rng: random.Random, locales: list[str], weights: list[int]):
    r = rng.random()
    if r < NEGATIVE_SHARE:
        locale = rng.choices(locales, weights)[0]
        return rng.choice(_PARSED_NEGATIVE), locale
    r -= NEGATIVE_SHARE
    if r < NATIVE_SHARE:
        locale = rng.choice(_EUROPEAN_NATIVE)
        return rng.choice(_PARSED_NATIVE[locale]), locale
    r -= NATIVE_SHARE
    if r < CJK_NATIVE_SHARE:
        locale = rng.choice(_CJK)
        return rng.choice(_PARSED_NATIVE[locale]), locale
    return rng.choice(_PARSED), rng.choices(locales, weights)[0]


def _row(rng: random.Random, fakers: dict, locales: list[str], weights: list[int]) -> dict:
    pieces: list[tuple[str, str | None]] = []
    n_parts = rng.choice((2, 2, 3)) if rng.random() < MULTI_SHARE else 1
    for i in range(n_parts):
        if i:
            pieces.append((rng.choice((" ", "\n", "\n\n", " ... ")), None))
        parsed, locale = _choose(rng, locales, weights)
        _render(parsed, _Ctx(rng=rng, fake=fakers[locale], fakers=fakers, locale=locale), pieces)

    r = rng.random()
    case = str.lower if r < LOWER_SHARE else str.upper if r < LOWER_SHARE + UPPER_SHARE else None
    chunks, spans, pos = [], [], 0
    for text, label in pieces:
        if case is not None:
            text = case(text)
        if label is not None:
            spans.append({"start": pos, "end": pos + len(text), "label": label})
        chunks.append(text)
        pos += len(text)
    return {"text": "".join(chunks), "spans": spans}


def iter_rows(count: int, seed: int) -> Iterator[dict]:
    """`count` rows ``{"text", "spans": [{"start", "end", "label"}]}``, identical for the same seed."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _rows(count, seed)


def _rows(count: int, seed: int) -> Iterator[dict]:
    from faker import Faker

    rng = random.Random(seed)
    fakers = {}
    for locale in LOCALES:
        fake = Faker(locale)
        fake.seed_instance(rng.getrandbits(64))
        _fix_order(fake)
        fakers[locale] = fake
    locales, weights = list(LOCALE_WEIGHTS), list(LOCALE_WEIGHTS.values())
    for _ in range(count):
        yield _row(rng, fakers, locales, weights)


def _fix_order(fake) -> None:
    """Some Faker providers build a word list from a set (it_IT's `cities`), whose order changes with each
    process's string hashing, so a seed would draw other cities run to run. Sort such lists in place."""
    for provider in fake.providers:
        cities = getattr(type(provider), "cities", None)
        if isinstance(cities, list):
            cities.sort()


def generate(count: int, seed: int = 42) -> list[dict]:
    """`count` synthetic PII rows in the span JSONL format, deterministic for `seed`."""
    return list(iter_rows(count, seed))


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows one JSON object a line (UTF-8, non-ASCII kept), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
