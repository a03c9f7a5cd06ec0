"""A synthetic PHI evaluation set and the scrubber's measured recall and precision.

synth_phi embeds invented identifiers (gold spans known) into clinical sentences, mixed with
clinical distractors that are not PHI ("BP 120/80", "4/5 strength", "L4-L5", "72 yo"). Some
formats are marked held out: they were written into this generator but the patterns in
medtune.phi were not tuned on them, so their recall is reported on its own ("held_out").
"""

from __future__ import annotations

import random
from collections import Counter

from medtune.phi import find_phi

PATTERN_TYPES = ["DATE", "AGE", "PHONE", "FAX", "EMAIL", "SSN", "MRN", "ID", "URL", "IP", "ZIP"]

# Names: "COMMON" first names are in medtune.phi's built-in list, "RARE" ones are not.
COMMON_FIRST = ["Linda", "Robert", "Maria", "James", "Olivia", "Ahmed", "Karen", "Daniel"]
RARE_FIRST = ["Tobias", "Ingrid", "Leopold", "Marisol", "Thaddeus", "Wren", "Oksana", "Bartholomew",
              "Calloway", "Ysolde", "Fenna", "Augustin"]
LAST = ["Okafor", "Nguyen", "Kowalski", "Haddad", "O'Brien", "McAllister", "Lindqvist", "Ferreira",
        "Abernathy", "Tanaka", "Duchene", "Varga", "Smith-Rowe", "Petrakis"]
STREETS = ["Maple", "Oak Hollow", "Kingsley", "Birch", "Harbor View", "Elm", "Juniper", "3rd"]
SUFFIXES = ["Street", "St", "Ave", "Avenue", "Rd", "Road", "Lane", "Blvd", "Drive", "Court", "Way"]
CITIES = ["Fairview", "Lakewood", "Cedar Falls", "Millbrook", "Port Ellis", "Brookhaven"]
STATES = ["IL", "OH", "TX", "CA", "NY", "WA", "MN", "GA"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DOMAINS = ["example.org", "mail.example.com", "clinic-example.net", "uhealth.example.edu"]

DISTRACTORS = [
    "BP 132/84, HR 95, RR 18, SpO2 94% on RA.", "Pain 7/10, improved to 3/10 after morphine 4 mg.",
    "Motor strength 4/5 in LLE.", "MRI L-spine: L4-L5 disc herniation, T2 hyperintense signal.",
    "CT A/P with contrast, 100 mL IV.", "Hx of C5-C6 ACDF in 2015.", "Plt 250,000; WBC 12.3.",
    "3/6 systolic murmur at LUSB.", "Visual acuity 20/40 OD.", "Metoprolol 25 mg PO BID.",
    "72 yo M with CAD and DM2.", "Temp 98.6 F.", "GCS 15/15.", "EF 55-60%.",
    "Glucose 126 mg/dL, INR 2.3.", "Follow up in 2 weeks.", "h/o Parkinson disease.",
    "Stage T2N1M0, Gleason 3+4=7.", "Apgar 8/9.", "Take 1/2 tab q6h x3 days.", "5 cm mass in RUL.",
    "Prior CT in 2021 showed a 4 mm nodule.", "88 yo F, lives alone.", "BMI 31.2, weight 92 kg.",
    "Na 138, K 4.1, Cr 1.2, BUN 22.", "ICD-10 M54.5, CPT 74177.", "s/p TKA 2019.",
    "HR 110-120s, BP 90/60.", "T2 weighted images of the brain.", "Ratio 1:2, O2 2 L NC.",
    "Titrate gabapentin 10-20-40 mg.", "Vitals T 37.2 P 88 R 16 BP 118/76.", "PHQ-9 score 14.",
    "A1c 7.2%, lipase 1,250.", "Positive Murphy sign, negative Babinski sign.",
    "Known Crohn's disease and Graves disease.", "Blood cultures positive on 2/2 sets.",
    "89 yo M, aged 67 at diagnosis.", "Levels T11-L1 and S1 nerve root.",
    "1.5 T MRI, slice 2.5 mm.",
    "DLP 1200 mGy-cm, CTDIvol 12.3, kVp 120.", "HIV 1/2 antibody negative.", "Bed 12, Unit 7B.",
    "ED arrival at 14:30, seen q4h.", "Hodgkin lymphoma s/p ABVD x6 cycles.", "May consider MRI.",
    "Glasgow Coma Scale 14.", "Foley catheter placed, 400 mL out.", "EBL 250 mL, 2 units PRBC.",
    "Page 2 of 3.", "Spoke with the patient and family at bedside.", "Dr. on call notified.",
]


def _d(rng: random.Random, lo: int, hi: int, width: int = 0) -> str:
    return str(rng.randint(lo, hi)).zfill(width)


def _digits(rng: random.Random, k: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(k))


def _phone(rng: random.Random) -> tuple[str, bool]:
    a, b, c = _d(rng, 201, 989), _d(rng, 200, 999), _d(rng, 0, 9999, 4)
    formats = [(f"({a}) {b}-{c}", False), (f"{a}-{b}-{c}", False), (f"{a}.{b}.{c}", False),
               (f"+1 {a} {b} {c}", False), (f"1-{a}-{b}-{c}", False),
               (f"{a}-{b}-{c} ext. 12", False), (f"({a}){b}-{c}", True),
               (f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}", True)]
    return rng.choice(formats)


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _date(rng: random.Random) -> tuple[str, str, bool]:
    """(before, date, held_out)."""
    y, m, d = rng.randint(1930, 2024), rng.randint(1, 12), rng.randint(1, 28)
    mon, nth = MONTHS[m - 1], _ordinal(d)
    before = rng.choice(["seen ", "DOB: ", "admitted ", "on ", "dated ", "last visit "])
    formats = [(before, f"{m:02d}/{d:02d}/{y}", False), (before, f"{m}/{d}/{y % 100:02d}", False),
               (before, f"{y}-{m:02d}-{d:02d}", False), (before, f"{mon} {d}, {y}", False),
               (before, f"{mon[:3]} {d}", False), (before, f"{d} {mon} {y}", False),
               (before, f"{mon} {y}", False), (before, f"{mon[:3]}. {nth}", False),
               (before, f"{y}-{m:02d}-{d:02d}T10:{d:02d}", False),
               (before, f"{d:02d}-{mon[:3]}-{y}", False), (before, f"{d}.{m}.{y}", True),
               (before + "the ", f"{nth} of {mon}", True), ("since ", f"{m}/{d}", False),
               ("f/u ", f"{m}/{d}", False), ("", f"{mon} {nth}, {y}", True)]
    return rng.choice(formats)


def _age(rng: random.Random) -> tuple[str, str, str, bool]:
    """(before, age, after, held_out): the gold span is the age itself."""
    a = str(rng.randint(90, 104))
    formats = [("", a, " yo", False), ("", a, "yo", False), ("", a, " y/o", False),
               ("", a, "-year-old", False), ("", a, " year old", False), ("age ", a, "", False),
               ("aged ", a, "", False), ("", a, "M", False), ("", a, " yoF", False),
               ("Age: ", a, "", True), ("", a, " yrs old", True),
               ("", rng.choice(["ninety-two", "ninety-six", "ninety"]), "-year-old", True)]
    return rng.choice(formats)


def _name(rng: random.Random) -> tuple[str, str, str, bool]:
    """(before, name, after, held_out)."""
    first = rng.choice(COMMON_FIRST + RARE_FIRST)
    last = rng.choice(LAST)
    rare = first in RARE_FIRST
    formats = [("seen by Dr. ", last, "", False),
               ("referred by Dr. ", f"{first} {last}", "", False),
               ("Patient: ", f"{last}, {first}", "", False), ("", f"{first} {last}", ", MD", False),
               ("pt name ", f"{first} {last}", "", False),
               ("spoke with ", f"{first} {last}", " (daughter)", False),
               ("Mrs. ", last, " called", False), ("PCP ", f"{first} {last}", "", False),
               ("", f"{first} {last}", " presented to the ED", rare),
               ("wife ", first, " at bedside", True)]
    return rng.choice(formats)


def _pick(rng: random.Random, formats: list[tuple[str, str, bool]]) -> tuple[str, str, str, bool]:
    before, value, held = rng.choice(formats)
    return before, value, "", held


def _identifier(kind: str, rng: random.Random) -> tuple[str, str, str, bool]:
    """(before, value, after, held_out) for one identifier of ``kind``."""
    dg = _digits
    if kind == "NAME":
        return _name(rng)
    if kind == "AGE":
        return _age(rng)
    if kind == "DATE":
        return _pick(rng, [_date(rng)])
    if kind in ("PHONE", "FAX"):
        cues = (["fax ", "Fax: ", "faxed to ", "fax no. "] if kind == "FAX" else
                ["call ", "Phone: ", "cell ", "tel ", "reachable at ", "callback # "])
        value, held = _phone(rng)
        return rng.choice(cues), value, "", held
    if kind == "EMAIL":
        user = rng.choice(["j.okafor", "tnguyen42", "wren+portal", "K_Varga", "pt1234"])
        cue = rng.choice(["email ", "e-mail: ", "contact "])
        return cue, f"{user}@{rng.choice(DOMAINS)}", "", False
    if kind == "SSN":
        ssn = f"{dg(rng, 3)}-{dg(rng, 2)}-{dg(rng, 4)}"
        return _pick(rng, [("SSN ", ssn, False), ("SSN: ", ssn.replace("-", ""), False),
                           ("social security no. ", ssn, False),
                           ("SS# ", ssn.replace("-", " "), True)])
    if kind == "MRN":
        return _pick(rng, [
            ("MRN: ", dg(rng, 7), False), ("MRN ", "00" + dg(rng, 6), False),
            ("MR# ", "A" + dg(rng, 6), False), ("acct # ", f"55-{dg(rng, 4)}-98", False),
            ("record no. ", "R" + dg(rng, 6), False), ("CSN ", dg(rng, 10), False),
            ("Encounter #", "E" + dg(rng, 6), False), ("chart ", dg(rng, 6), False),
            ("med rec ", dg(rng, 7), True), ("hosp no ", dg(rng, 8), True)])
    if kind == "ID":
        return _pick(rng, [
            ("member ID ", "XJH" + dg(rng, 9), False), ("policy no. ", dg(rng, 10), False),
            ("DEA ", "BX" + dg(rng, 7), False), ("NPI ", dg(rng, 10), False),
            ("license #", "D" + dg(rng, 7), False),
            ("DL: ", f"S{dg(rng, 3)}-{dg(rng, 4)}-{dg(rng, 4)}", False),
            ("serial no. ", "SN-" + dg(rng, 8), False), ("VIN ", "1HGCM8" + dg(rng, 11), False),
            ("pacemaker serial ", "PJN" + dg(rng, 6), False),
            ("plate ", f"{dg(rng, 1)}ABC{dg(rng, 3)}", True)])
    if kind == "URL":
        path = rng.choice(["", "/records/" + dg(rng, 4), "/p?id=" + dg(rng, 5)])
        dom = rng.choice(DOMAINS)
        cue = rng.choice(["see ", "portal: ", "images at ", "link "])
        return _pick(rng, [
            (cue, f"https://portal.{dom}{path}", False), (cue, f"http://www.{dom}", False),
            (cue, f"www.{dom}{path}", False), (cue, f"mychart.{dom}{path}", False),
            (cue, f"https://10.{rng.randint(0, 255)}.0.{rng.randint(1, 254)}/pacs", True)])
    if kind == "IP":
        v4 = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        hx = [f"{rng.randint(0, 65535):x}" for _ in range(8)]
        cue = rng.choice(["IP ", "from host ", "workstation ", "logged from "])
        return _pick(rng, [(cue, v4, False), (cue, ":".join(hx), False),
                           (cue, f"2001:db8::{hx[0]}:{hx[1]}", False),
                           (cue, f"fe80::{hx[2]}", False), (cue, f"::ffff:{v4}", True)])
    raise ValueError(kind)


def _address(rng: random.Random) -> list[tuple[str, str | None, bool]]:
    """An address as segments (text, type or None, held_out)."""
    street = f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(SUFFIXES)}"
    if rng.random() < 0.3:
        street += f", Apt {rng.randint(1, 40)}{rng.choice('ABC')}"
    zipc = _digits(rng, 5) + (f"-{_digits(rng, 4)}" if rng.random() < 0.3 else "")
    city, state = rng.choice(CITIES), rng.choice(STATES)
    style = rng.randrange(4)
    if style == 0:
        return [("lives at ", None, False), (street, "ADDRESS", False), (", ", None, False),
                (city, "ADDRESS", False), (f", {state} ", None, False), (zipc, "ZIP", False)]
    if style == 1:
        return [("home: ", None, False), (street, "ADDRESS", False), (", zip ", None, False),
                (zipc, "ZIP", False)]
    if style == 2:
        box = f"PO Box {rng.randint(10, 9999)}"
        return [("mailing address ", None, False), (box, "ADDRESS", False), (", ", None, False),
                (city, "ADDRESS", False), (f", {state} ", None, False), (zipc, "ZIP", False)]
    return [("moved to ", None, False), (city, "ADDRESS", True), (" last year", None, False)]


KINDS = ["NAME", "DATE", "AGE", "PHONE", "FAX", "EMAIL", "SSN", "MRN", "ID", "URL", "IP", "ADDRESS"]


def _sample(rng: random.Random) -> tuple[str, list[tuple[int, int, str, bool]]]:
    segments: list[tuple[str, str | None, bool]] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.6:
            segments.append((rng.choice(DISTRACTORS) + " ", None, False))
        kind = rng.choice(KINDS)
        if kind == "ADDRESS":
            segments += _address(rng)
        else:
            before, value, after, held = _identifier(kind, rng)
            before = before[:1].upper() + before[1:] if not segments else before
            segments += [(before, None, False), (value, kind, held), (after, None, False)]
        segments.append((rng.choice([". ", "; ", ". "]), None, False))
    if rng.random() < 0.5:
        segments.append((rng.choice(DISTRACTORS), None, False))
    text, spans, pos = "", [], 0
    for piece, label, held in segments:
        if label is not None:
            spans.append((pos, pos + len(piece), label, held))
        text += piece
        pos += len(piece)
    return text.strip(), spans


def _synth(n: int, seed: int) -> list[tuple[str, list[tuple[int, int, str, bool]]]]:
    rng = random.Random(f"phi:{seed}")
    return [_sample(rng) for _ in range(n)]


def synth_phi(n: int, seed: int = 0) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """``n`` texts with their gold identifier spans (start, end, type)."""
    return [(text, [(s, e, k) for s, e, k, _ in spans]) for text, spans in _synth(n, seed)]


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def evaluate_scrubber(n: int = 2000, seed: int = 0) -> dict:
    """Span-level recall and precision of medtune.phi.find_phi on synth_phi(n, seed).

    A gold span is found when one predicted span (any type) covers all of it. Precision: predicted
    spans that overlap some gold span / all predicted spans.
    """
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    held_found: Counter[str] = Counter()
    held_total: Counter[str] = Counter()
    pred_ok: Counter[str] = Counter()
    pred_all: Counter[str] = Counter()
    for text, gold in _synth(n, seed):
        predicted = find_phi(text)
        for start, end, kind, held in gold:
            hit = any(ps <= start and end <= pe for ps, pe, _ in predicted)
            total[kind] += 1
            found[kind] += hit
            if held:
                held_total[kind] += 1
                held_found[kind] += hit
        for ps, pe, kind in predicted:
            pred_all[kind] += 1
            pred_ok[kind] += any(ps < end and start < pe for start, end, _, _ in gold)
    pattern = [k for k in PATTERN_TYPES if total[k]]
    return {
        "n": n, "seed": seed,
        "recall": {k: _ratio(found[k], total[k]) for k in sorted(total)},
        "support": dict(sorted(total.items())),
        "precision": {k: _ratio(pred_ok[k], pred_all[k]) for k in sorted(pred_all)},
        "recall_overall": _ratio(sum(found.values()), sum(total.values())),
        "recall_pattern_types": _ratio(sum(found[k] for k in pattern),
                                       sum(total[k] for k in pattern)),
        "recall_names": _ratio(found["NAME"], total["NAME"]),
        "precision_overall": _ratio(sum(pred_ok.values()), sum(pred_all.values())),
        "held_out_recall": {k: _ratio(held_found[k], held_total[k]) for k in sorted(held_total)},
        "held_out_support": dict(sorted(held_total.items())),
    }
