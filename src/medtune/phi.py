"""PHI scrubbing: find HIPAA Safe Harbor identifiers in free text and replace them with
placeholders ("[NAME]", "[DATE]", ...). Pattern based, no model download.

Clinical content must survive: "L4-L5", "T2 weighted", "CT A/P", "5 mg", "70 yo", "BP 120/80",
"5/10 pain", a bare year. Ages are identifiers only above 89; dates only when more specific
than a year. Spans from all detectors are merged where they overlap (the union is replaced), so
a partly recognised identifier is never left half in the text.

Known limits (measured by medtune.phi_synth.evaluate_scrubber): a name with no title, cue word
("seen by", "wife", "name:") or known first name is not found, nor a single first name after a
cue ("wife Maria"); a city only counts as part of "City, ST 12345" or a street address; a bare
month/day ("3/4") right after a clinical word ("strength 3/4", "x 3/4") is kept as a value;
an all-caps title ("DR. SMITH") counts only after a cue word ("SEEN BY DR. SMITH", "PAGED DR
JONES"; DR, MR and MS are clinical abbreviations too) except MRS and PROF.; a title's name split
over two lines is not found.
Accented and other cased letters, full-width digits and Unicode dashes are read as their ASCII
shapes (``fold``); names in scripts without letter case (Chinese, Japanese, Arabic, ...) are
not found.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterator

PLACEHOLDERS = ["[NAME]", "[DATE]", "[AGE]", "[PHONE]", "[FAX]", "[EMAIL]", "[SSN]", "[MRN]",
                "[ID]", "[URL]", "[IP]", "[ADDRESS]", "[ZIP]"]
TYPES = [p[1:-1] for p in PLACEHOLDERS]
# When detectors overlap, the merged span takes the type that comes first here.
PRIORITY = ["EMAIL", "URL", "IP", "SSN", "FAX", "PHONE", "MRN", "ID", "DATE", "ZIP", "ADDRESS",
            "AGE", "NAME"]


def _words(block: str) -> set[str]:
    return set(block.split())


def _alt(options: list[str] | set[str]) -> str:
    """A non-capturing alternation, longest option first."""
    return "(?:" + "|".join(sorted(options, key=len, reverse=True)) + ")"


STATES = _words("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT "
                "NE NV NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR")
STATE_RE = _alt(STATES)

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December", "Jan", "Feb", "Mar", "Apr", "Jun",
           "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec"]
# lower-case month words count only when unambiguous ("may", "march" are verbs; "dec" means
# decreased): abbreviations and these two only when capitalised
_AMBIGUOUS_LOWER = {"may", "march"}
MONTH = "(?:" + "|".join(sorted(
    {m for name in _MONTHS for m in (name, name.upper(), name.lower())
     if m != name.lower() or (len(m) > 4 and m not in _AMBIGUOUS_LOWER)},
    key=len, reverse=True)) + r")\.?"
DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
YEAR = r"(?:1[89]\d\d|20\d\d)"

FIRST_NAMES = _words("""
James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel
Matthew Anthony Mark Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald
Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon
Benjamin Samuel Gregory Alexander Patrick Raymond Jack Dennis Jerry Tyler Aaron Jose Adam
Henry Nathan Douglas Zachary Peter Kyle Walter Ethan Jeremy Harold Keith Christian Roger Noah
Gerald Carl Terry Sean Austin Arthur Lawrence Jesse Dylan Bryan Joe Jordan Billy Bruce Albert
Willie Gabriel Logan Alan Juan Wayne Roy Ralph Randy Eugene Vincent Russell Elijah Louis Bobby
Philip Johnny Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy
Betty Margaret Sandra Ashley Kimberly Emily Donna Michelle Carol Amanda Dorothy Melissa Deborah
Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Angela Shirley Anna Brenda Pamela Emma
Nicole Helen Samantha Katherine Christine Debra Rachel Carolyn Janet Catherine Maria Heather
Diane Ruth Julie Olivia Joyce Virginia Victoria Kelly Lauren Christina Joan Evelyn Judith Megan
Andrea Cheryl Hannah Jacqueline Martha Gloria Teresa Ann Sara Madison Frances Kathryn Janice
Jean Abigail Alice Judy Sophia Denise Doris Marilyn Danielle Beverly Isabella Theresa Diana
Natalie Brittany Charlotte Marie Kayla Alexis Lori Priya Wei Mohammed Ahmed Fatima Aisha Carlos
Luis Miguel Sofia Lucia Hiroshi Yuki Mei Ravi Anil Sunita Olga Ivan Dmitri Ana Pedro Rosa
""")

# Capitalised words that are not names (stop a name match, or veto one).
NOT_NAMES = _words("""
The A An And Or Of In On At To For With Without From By No Not Is Was Has Had Per Via Re
Patient Pt Presents Denies Reports Notes History Hx Pain Chest Head Neck Back Left Right
Bilateral Acute Chronic Disease Syndrome Sign Palsy Emergency Department Hospital Clinic Center
Medical Unit Room Team Service Radiology Cardiology Neurology Surgery Medicine Oncology Urology
Attending Referring Ordering Reading Signed Dictated Reviewed Seen Referred Called Contact
Monday Tuesday Wednesday Thursday Friday Saturday Sunday Today Yesterday Tomorrow Street Avenue
Road Exam Impression Findings Indication Reason Plan Assessment Note Report Order Dose Daily
Mother Father Wife Husband Son Daughter Sister Brother Spouse Contrast Protocol Positive Negative
Normal Abnormal Study Follow Up Please Thanks Thank Name Date Age Phone Fax Email Address
Physical Occupational Speech Respiratory Therapy Therapist Nephrology Pulmonology Pulmonary
Gastroenterology Hematology Endocrinology Rheumatology Dermatology Psychiatry Psychology
Pediatrics Obstetrics Gynecology Orthopedics Ortho Infectious Diseases Palliative Care Social
Work Worker Hospice Nursing Pharmacy Anesthesia Renal Gi Icu Micu Sicu Ed Er Consult Consults
Recs Recommendations Interventional Vascular Neurosurgery Ent Ob Gyn
""") | {m for m in _MONTHS}

# Drugs often written capitalised right after a name ("Dr. Smith Lisinopril 10 mg"): a name
# ends before them. Generic and brand names; none is a common surname.
DRUGS = _words("""
Acetaminophen Tylenol Ibuprofen Motrin Advil Naproxen Aleve Aspirin Asa Ketorolac Toradol
Morphine Hydromorphone Dilaudid Oxycodone Percocet Hydrocodone Norco Fentanyl Tramadol Codeine
Gabapentin Neurontin Pregabalin Lyrica Lisinopril Losartan Amlodipine Norvasc Metoprolol
Lopressor Toprol Carvedilol Coreg Atenolol Propranolol Labetalol Hydralazine Diltiazem Verapamil
Furosemide Lasix Bumetanide Bumex Torsemide Spironolactone Hydrochlorothiazide Hctz Chlorthalidone
Atorvastatin Lipitor Simvastatin Rosuvastatin Crestor Pravastatin Warfarin Coumadin Heparin
Enoxaparin Lovenox Apixaban Eliquis Rivaroxaban Xarelto Dabigatran Pradaxa Clopidogrel Plavix
Ticagrelor Brilinta Digoxin Amiodarone Nitroglycerin Metformin Glucophage Insulin Lantus
Humalog Novolog Glipizide Glyburide Sitagliptin Januvia Empagliflozin Jardiance Semaglutide
Ozempic Liraglutide Levothyroxine Synthroid Prednisone Prednisolone Methylprednisolone Solumedrol
Dexamethasone Decadron Hydrocortisone Albuterol Proventil Ipratropium Tiotropium Spiriva
Fluticasone Budesonide Montelukast Singulair Omeprazole Prilosec Pantoprazole Protonix
Esomeprazole Nexium Famotidine Pepcid Ondansetron Zofran Metoclopramide Reglan Docusate Colace
Senna Miralax Lactulose Amoxicillin Augmentin Ampicillin Unasyn Piperacillin Zosyn Cefazolin
Ancef Ceftriaxone Rocephin Cefepime Cephalexin Keflex Vancomycin Vanco Meropenem Ciprofloxacin
Cipro Levofloxacin Levaquin Azithromycin Zithromax Doxycycline Clindamycin Metronidazole Flagyl
Nitrofurantoin Macrobid Bactrim Sulfamethoxazole Trimethoprim Linezolid Acyclovir Valacyclovir
Oseltamivir Tamiflu Fluconazole Diflucan Sertraline Zoloft Fluoxetine Prozac Citalopram
Escitalopram Lexapro Paroxetine Venlafaxine Duloxetine Cymbalta Bupropion Wellbutrin Trazodone
Mirtazapine Quetiapine Seroquel Olanzapine Zyprexa Risperidone Haloperidol Haldol Aripiprazole
Lorazepam Ativan Alprazolam Xanax Clonazepam Klonopin Diazepam Valium Midazolam Versed Zolpidem
Ambien Melatonin Levetiracetam Keppra Phenytoin Dilantin Valproate Depakote Lamotrigine
Lamictal Carbamazepine Topiramate Donepezil Aricept Memantine Carbidopa Levodopa Sinemet
Allopurinol Colchicine Methotrexate Hydroxychloroquine Plaquenil Tamsulosin Flomax Finasteride
Oxybutynin Potassium Magnesium Calcium Iron Ferrous Folic Thiamine Cyanocobalamin Naloxone
Narcan Epinephrine Norepinephrine Levophed Vasopressin Dopamine Dobutamine Propofol Ketamine
Lidocaine Tpa Alteplase Tenecteplase Gadolinium Omnipaque Iohexol
""")

_NAME_TOKEN = (r"(?:(?:Mc|Mac|O'|D')?[A-Z][a-z]+(?:[A-Z][a-z]+)?(?:['-][A-Z]?[a-z]+)*(?![A-Za-z])|"
               r"(?:[A-Z]\.){1,3}|[A-Z](?=[ \t]+[A-Z][a-z]))")
# a title, then the name on the same line ("Dr. Smith", "Dr.Smith"); after a title an all-caps
# surname counts too ("Dr. ALLEN"); "DR", "MR", "MS" alone stay clinical (retinopathy,
# mitral regurgitation, multiple sclerosis)
_TITLE = r"\b(?:Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor)(?:[ \t]?\.[ \t]*|[ \t]+)"
_NAME_SEQ = rf"{_NAME_TOKEN}(?:[ \t]+{_NAME_TOKEN}){{0,2}}"
_TITLED_NAME = rf"(?:{_NAME_TOKEN}|[A-Z][A-Z'-]+(?![A-Za-z]))(?:[ \t]+{_NAME_TOKEN}){{0,2}}"
_UPPER_NAME = r"[A-Z][A-Z'-]+,\s*[A-Z][A-Za-z'-]+"  # "SMITH, JOHN" / "Smith, John"
# An all-caps title ("DR. SMITH"): DR, MR and MS are also diabetic retinopathy, mitral
# regurgitation and multiple sclerosis, so one counts only after a cue word ("seen by", "per",
# "called") and MR / MS / MX / MISS only with their dot; MRS and PROF. count anywhere. The name
# is one all-caps or capitalised word, two when the first is a known first name or an initial.
_CAPS_WORD = r"[A-Z][A-Z'-]+(?![A-Za-z])"
_CAPS_TITLE = r"(?i:DR|DOCTOR|MRS|PROF|(?:MR|MS|MX|MISS)(?=[ \t]?\.))"  # after a cue: any case

_CUE_FOR_NAME = (r"(?i:patient|pt|patient name|pt name|name|seen by|referred by|referring|"
                 r"referring physician|attending|pcp|primary care|signed by|dictated by|"
                 r"transcribed by|reviewed by|read by|cc|contact|nok|next of kin|"
                 r"emergency contact|wife|husband|spouse|son|daughter|mother|father|sister|"
                 r"brother|guardian|caregiver|discussed with|spoke with|d/w|per|surgeon|"
                 r"provider|physician|resident|nurse)")

_CAPS_NAME = (r"(?:(?:" + "|".join(sorted(n.upper() for n in FIRST_NAMES)) + r"|[A-Z]\.?)[ \t]+"
              + _CAPS_WORD + "|" + _NAME_SEQ + "|" + _CAPS_WORD + ")")
_CUE_FOR_TITLE = _CUE_FOR_NAME[:-1] + r"|call(?:ed)?|pag(?:e|ed)|notif(?:y|ied)|informed)"

_NO = r"(?:\s+(?:number|no\.?|#|num|id))"  # "record no.", "account #", "visit id"
_MRN_CUES = _alt(
    [r"(?i:mrn|mr\s?#|mr\s?no\.?|acct\.?)", r"(?i:medical\s+record|chart|account)" + _NO + "?",
     r"(?i:record|visit|admission|hospital)" + _NO, r"(?i:encounter|accession)" + _NO + "?",
     "CSN", "FIN"])
_ID_CUES = _alt(
    [r"(?i:patient|pt|device|plan|subscriber)\s+id", r"(?i:case|group|id)" + _NO,
     r"(?i:member|policy|insurance|health\s+plan|license|driver'?s\s+license|serial|plate|"
     r"certificate|passport|specimen)" + _NO + "?", "DL", "DEA", "NPI", "VIN", "ID"])
_ID_VALUE = r"(?=[A-Za-z0-9-]{0,24}\d{3})[A-Za-z]{0,4}-?\d[A-Za-z0-9-]{0,30}[A-Za-z0-9]"
_SEP = r"\s*(?:#|:|no\.?|number|is)?\s*[:#]?\s*"
# what follows a number pair / triple that is a quantity, not a date ("4/5 strength",
# "2/2 sets", "10-20-40 mg")
_UNITS = (r"mg|mcg|g|kg|ml|l|units?|iu|meq|mmol|mmhg|cm|mm|%|tabs?|tablets?|caps?|doses?|"
          r"sets|bottles|cultures|views|samples|specimens|nodes|vessels|beats|ns")
_NOT_A_DATE_AFTER = re.compile(
    r"\s*(?:(?:" + _UNITS + r"|pain|strength|murmur|vision|score|scale|reflex(?:es)?|power|of|"
    r"in|x|[lr]?[lu]e|bilat\w*|ext\w*|flex\w*|grip|esm|sem|hsm|systolic|diastolic|holo\w*|"
    r"pan\w*|early|late|mid|throughout|globally|symmetric\w*)\b|%)", re.I)
# a number pair right after one of these is a clinical value ("pain 5/10", "Gr. 4/6", "BP 90/60")
_VALUE_BEFORE = re.compile(
    r"\b(?:pain|score|scale|strength|motor|power|murmur|grade|gr|apgars?|gcs|bp|sbp|dbp|ratio|asa|"
    r"reflex\w*|dtrs?|hiv|ef|vision|acuity|va|rom|mmt|x)\b[^a-z]*$", re.I)
_DATE_CUES = (r"(?i:on|since|from|dated?|dos|dob|admitted|adm|discharged|d/c|until|thru|through|"
              r"as of|last|seen|visit|performed|done|obtained|scheduled|sched|f/u|returned|"
              r"started|stopped|between|by|effective|due|drawn|collected|onset|surgery|"
              r"birthday|born|expires?|exp)")
_DATE_CUE_BEFORE = re.compile(r"\b" + _DATE_CUES + r"\s*:?\s*\(?$")

Check = Callable[[re.Match[str]], bool]
Pattern = tuple[re.Pattern[str], str, int, Check | None]  # regex, type, group, extra check
_I = re.IGNORECASE


def _numeric_date(m: re.Match[str]) -> bool:
    if _NOT_A_DATE_AFTER.match(m.string, m.end()):
        return False
    a, b = int(m.group(1)), int(m.group(3))
    return (a <= 12 and 1 <= b <= 31) or (b <= 12 and 1 <= a <= 31)


def _month_day(m: re.Match[str]) -> bool:
    """'3/4', 'since 3/4', 's/p TKA 6/17' are dates; '4/5 strength', 'pain 5/10', 'Gr. 4/6',
    '1/2 tab' and '2/2' ("secondary to") are not."""
    value = m.group(1)
    if _NOT_A_DATE_AFTER.match(m.string, m.end()):
        return False
    before = m.string[max(0, m.start(1) - 20):m.start(1)]
    if _DATE_CUE_BEFORE.search(before):
        return True
    if value in ("1/2", "2/2") or value.endswith("/10"):  # a half, "secondary to", pain scale
        return False
    return not _VALUE_BEFORE.search(before)


def _not_temperature(m: re.Match[str]) -> bool:
    """'97F' is an age, 'Temp 97 F' / 'T: 95F' / 'temperature of 101 F' is not."""
    before = m.string[max(0, m.start() - 24):m.start()]
    return not re.search(r"\b(?:t|temp\w*|tmax|tc|fever|febrile|afebrile)"
                         r"(?:\W+(?:of|was|is|at|to|up to|reached))?\W*$", before, re.I)


# what follows a number that is a quantity, not an identifier ("ID: 1250 mg", "1200000 copies")
_QUANTITY_AFTER = re.compile(r"\s*(?:(?:" + _UNITS + r"|copies|cells|iu/ml|/ml|/ul|/mm3|/hpf)"
                             r"(?![a-z])|/(?:ml|ul|mm3|hpf)\b)", re.I)


def _not_quantity(m: re.Match[str]) -> bool:
    return not _QUANTITY_AFTER.match(m.string, m.end())


_EPONYM_NOUN = re.compile(r"[ \t]+(?:syndrome|disease|murmur|sign|palsy|reflex|test|maneuver|"
                          r"manoeuvre|fracture|procedure|phenomenon|lesion|node|classification|"
                          r"score|criteria|triad|law|equation|operation)\b", re.I)


def _not_eponym(m: re.Match[str]) -> bool:
    """'Austin Flint murmur', 'Charles Bonnet syndrome': a first name in a medical eponym."""
    return not _EPONYM_NOUN.match(m.string, m.end(1))


def _enough_digits(m: re.Match[str]) -> bool:
    return sum(c.isdigit() for c in m.group(1)) >= 7


def _phone_context(m: re.Match[str]) -> bool:
    """A bare 10-digit number is a phone number when a phone word comes shortly before it."""
    before = m.string[max(0, m.start() - 30):m.start()].lower()
    return any(w in before for w in ("fax", "phone", "call", "tel", "cell", "pager", "text"))


def _p(regex: str, kind: str, group: int = 0, flags: int = 0, check: Check | None = None
       ) -> Pattern:
    return re.compile(regex, flags), kind, group, check


_STREET_TYPE = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|"
                r"Place|Pl|Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|"
                r"Loop)\b\.?")
_UNIT = r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Rm|Room|Fl|Floor|#)\.?\s*#?\s*[A-Za-z0-9-]+)?"

PATTERNS: list[Pattern] = [
    # repetitions are bounded everywhere: a 1 MB field of "1.1.1.1..." must not go quadratic
    _p(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b",
       "EMAIL"),
    _p(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')\]]*[^\s<>\"')\].,;:!?]", "URL", flags=_I),
    _p(r"\b(?:[A-Za-z0-9-]{1,63}\.){1,8}(?:com|org|net|edu|gov|io|us|info|health|biz|me|co\.uk)\b"
       r"(?:/[^\s<>\"')\]]*[^\s<>\"')\].,;:!?])?", "URL", flags=_I),
    _p(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
       r"(?!\d|\.\d)", "IP"),
    _p(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])", "SSN"),
    _p(r"\b(?i:ssn|ss#|social security(?:\s+(?:number|no\.?|#))?)" + _SEP +
       r"(\d{9}|\d{3}[\s.-]\d{2}[\s.-]\d{4})\b", "SSN", 1),
    _p(r"(?<![\w+-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s*|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\d-])"
       r"(?:\s*(?:x|ext\.?|extension)\s*\d{1,5})?", "PHONE", flags=_I),
    _p(r"(?<![\w])\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)|\d{1,4})(?:[\s.-]?\d{2,4}){2,4}\b", "PHONE"),
    _p(r"\b(?:(?i:phone|tel|telephone|cell|mobile|mob|pager|beeper|home|work|callback|"
       r"call back|fax|facsimile)|Ph|PH|ph)\b" + _SEP + r"(\+?\(?\d[\d\s().-]{5,}\d)", "PHONE", 1,
       check=_enough_digits),
    _p(r"\b(?:" + _MRN_CUES + ")" + _SEP + "(" + _ID_VALUE + ")", "MRN", 1),
    _p(r"\b(?:" + _ID_CUES + ")" + _SEP + "(" + _ID_VALUE + ")", "ID", 1, check=_not_quantity),
    _p(r"(?<![\w.-])\d{10}(?![\w-])", "PHONE", check=_phone_context),
    _p(r"(?<![\w-])#\s?\d{5,}\b", "ID"),
    _p(r"(?<![\w.-])\d{7,}(?![\w-])", "ID", check=_not_quantity),
    _p(r"\b[A-Z]{1,3}\d{6,}\b", "ID"),
    # dates: month names, numeric d/m/y and y-m-d, month/year, cued month/day
    _p(rf"\b{MONTH}\s+{DAY}(?:,?\s+{YEAR})?\b", "DATE"),
    _p(rf"\b{DAY}\s+(?:of\s+)?{MONTH}(?:,?\s+{YEAR})?\b", "DATE"),
    _p(rf"\b{MONTH},?\s+(?:of\s+)?{YEAR}\b", "DATE"),
    _p(rf"(?<![\w-])(?:0?[1-9]|[12]\d|3[01])[-/ ]{MONTH}[-/ ](?:{YEAR}|\d\d)\b", "DATE"),
    _p(r"(?<![\w-])(?:0?[1-9]|[12]\d|3[01])(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
       rf"(?:{YEAR}|\d\d)\b", "DATE"),
    _p(rf"\b{MONTH}[-/](?:0?[1-9]|[12]\d|3[01])[-/](?:{YEAR}|\d\d)\b", "DATE"),
    _p(r"(?<![\w/.-])(?:1[89]|20)\d{2}[-/](?:0[1-9]|1[0-2])(?![\w/-]|[-/.]\d)", "DATE"),
    _p(r"(?<![\w/.-])(\d{1,2})([/.-])(\d{1,2})\2(\d{4}|\d{2})(?![\w/-]|\.\d)", "DATE",
       check=_numeric_date),
    _p(r"(?<![\w/.-])(?:1[89]|20)\d{2}([-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])"
       r"(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?(?![\d/])", "DATE"),
    _p(r"(?<![\w/.-])(?:0?[1-9]|1[0-2])[/-](?:1[89]|20)\d{2}(?![\w/-])", "DATE"),
    _p(r"(?<![\w/.])((?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01]))(?![\w/]|\.\d)", "DATE", 1,
       check=_month_day),
    # ages over 89
    _p(r"\b(9\d|1[0-2]\d)(?=\s*-?\s*(?:yoM|yoF|yo\b|y/o|y\.o\.?|yrs?\b|years?\b|year-old|"
       r"y[MF]\b))", "AGE", 1, _I),
    _p(r"\b(?:age|aged|age:)\s*:?\s*(9\d|1[0-2]\d)\b", "AGE", 1, _I),
    _p(r"(?<![\d.])(9\d|1[0-2]\d)(?=\s?[MF]\b)", "AGE", 1, check=_not_temperature),
    _p(r"\b(?:ninety|one hundred)(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?"
       r"(?=[- ](?:year|yr))", "AGE", 0, _I),
    # geography: ZIP after a state or cue, ZIP+4, street address, PO box, "City, ST"
    _p(r"\b" + STATE_RE + r",?\s+(\d{5}(?:-\d{4})?)\b", "ZIP", 1),
    _p(r"\b(?i:zip|zip code|zipcode|postal code)\s*:?\s*(\d{5}(?:-\d{4})?)\b", "ZIP", 1),
    _p(r"(?<![\d-])\d{5}-\d{4}(?![\d-])", "ZIP"),
    _p(r"\b\d{1,6}\s+(?:[NSEW]\.?\s+)?(?:(?:[A-Z][A-Za-z'-]*|\d{1,3}(?:st|nd|rd|th))\.?\s+){1,4}"
       + _STREET_TYPE + _UNIT, "ADDRESS"),
    # the city and ZIP code after a street address, without a state: "..., Springfield 02139"
    _p(r"\b" + _STREET_TYPE + _UNIT + r",?\s+([A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2},?\s+\d{5}(?:-\d{4})?)\b",
       "ADDRESS", 1),
    _p(r"\b(?i:p\.?\s?o\.?\s+box)\s+\d+\b", "ADDRESS"),
    _p(r"\b([A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2}),\s+" + STATE_RE + r"\b(?=,?\s+\d{5}\b)",
       "ADDRESS", 1),
    # names: after a title, after a cue word, "Last, First", with a credential, known first names
    _p(_TITLE + "(" + _TITLED_NAME + ")", "NAME1", 1),
    _p(r"\b" + _CUE_FOR_TITLE + r"\s*:?[ \t]+" + _CAPS_TITLE + r"(?:[ \t]?\.[ \t]*|[ \t]+)("
       + _CAPS_NAME + ")", "NAME1", 1),
    _p(r"\b(?:MRS|PROF(?=\.))(?:[ \t]?\.[ \t]*|[ \t]+)(" + _CAPS_NAME + ")", "NAME1", 1),
    _p(r"\b" + _CUE_FOR_NAME + r"\s*:?\s+(" + _UPPER_NAME + r"(?:\s+[A-Z]\.?)?)", "NAME", 1),
    _p(r"\b" + _CUE_FOR_NAME + r"\s*:\s*(" + _NAME_TOKEN + r",\s*" + _NAME_TOKEN +
       r"(?:\s+[A-Z]\.)?)", "NAME", 1),
    _p(r"\b" + _CUE_FOR_NAME + r"\s*:?\s+(" + _NAME_TOKEN + r"(?:\s+" + _NAME_TOKEN + "){1,2})",
       "NAME", 1),
    _p(r"\b((?:" + _NAME_TOKEN + r",[ \t]*)?" + _NAME_SEQ +
       r"),?[ \t]+(?:MD|M\.D\.|DO|RN|NP|PA-C|PhD|DPM|DDS|CRNA|APRN|FNP)(?![A-Za-z])", "NAME1", 1),
    _p(r"\b((?:" + "|".join(sorted(FIRST_NAMES)) + r")(?:[ \t]+[A-Z]\.)?[ \t]+" + _NAME_TOKEN + r")\b",
       "NAME", 1, check=_not_eponym),
]


def _trim_name(text: str, start: int, end: int, min_tokens: int) -> tuple[int, int] | None:
    """Drop capitalised non-name words ("Radiology", "Left") from both ends of a name span;
    None when fewer than ``min_tokens`` words are left."""
    tokens = [(m.start() + start, m.end() + start)
              for m in re.finditer(r"[^\s,]+", text[start:end])]
    while tokens and text[tokens[0][0]:tokens[0][1]].rstrip(".").title() in NOT_NAMES:
        tokens.pop(0)
    while tokens:  # a drug ends a name, but is never its first word ("Dr. Lasix")
        last = text[tokens[-1][0]:tokens[-1][1]].rstrip(".").title()
        if last not in NOT_NAMES and (len(tokens) == 1 or last not in DRUGS):
            break
        tokens.pop()
    if len(tokens) < max(1, min_tokens):
        return None
    return tokens[0][0], tokens[-1][1]


def _ipv6(text: str) -> Iterator[tuple[int, int, str]]:
    for m in re.finditer(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
                         r"(?::(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])", text):
        candidate = m.group(0)
        if candidate.count(":") < 2 or ("::" not in candidate and candidate.count(":") < 7):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.start(), m.end(), "IP"


def _candidates(text: str) -> Iterator[tuple[int, int, str]]:
    yield from _ipv6(text)
    for regex, kind, group, check in PATTERNS:
        for m in regex.finditer(text):
            start, end = m.span(group)
            if start == end or (check is not None and not check(m)):
                continue
            if kind in ("NAME", "NAME1"):  # NAME1: one word is enough ("Dr. Smith")
                trimmed = _trim_name(text, start, end, 1 if kind == "NAME1" else 2)
                if trimmed is not None:
                    yield *trimmed, "NAME"
            elif kind == "PHONE" and "fax" in text[max(0, start - 20):start].lower():
                yield start, end, "FAX"
            else:
                yield start, end, kind


@functools.lru_cache(maxsize=8192)
def _fold_char(ch: str) -> str:
    """One character for the patterns to see: an ASCII dash for any dash, the base letter or
    digit of an accented or full-width one ("é" -> "e", "Ｍ" -> "M"), "A"/"a" for any other
    cased letter or a combining mark (so "Łukasz" still looks like a capitalised word)."""
    kind = unicodedata.category(ch)
    if kind == "Pd" or ch == "\u2212":  # any dash punctuation, and the minus sign
        return "-"
    if ch in "\u2018\u2019\u02bc":  # curly and modifier apostrophes: O’Brien
        return "'"
    parts = unicodedata.normalize("NFKD", ch)
    if parts[0].isascii() and parts[0].isprintable() and all(map(unicodedata.combining, parts[1:])):
        return parts[0]
    if kind in ("Lu", "Lt"):
        return "A"
    return "a" if kind in ("Ll", "Mn") else ch


def fold(text: str) -> str:
    """``text`` as the patterns read it, one character for each character (the spans found in
    it are the spans in ``text``): names with accents ("José Núñez"), dates and phone numbers
    with Unicode dashes ("2021\u201303\u201314") are found like their ASCII spellings."""
    return text if text.isascii() else "".join(map(_fold_char, text))


def find_phi(text: str) -> list[tuple[int, int, str]]:
    """Spans (start, end, type) of identifiers in ``text``: sorted, non-overlapping."""
    rank = {k: i for i, k in enumerate(PRIORITY)}
    spans: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(_candidates(fold(text))):
        if spans and start < spans[-1][1]:  # overlap: merge, keep the higher-priority type
            s0, e0, k0 = spans[-1]
            spans[-1] = (s0, max(e0, end), k0 if rank[k0] <= rank[kind] else kind)
        else:
            spans.append((start, end, kind))
    return spans


def replace_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, pos = [], 0
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(f"[{kind}]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def scrub_text(text: str) -> str:
    """``text`` with every identifier found by find_phi replaced by its placeholder."""
    return replace_spans(text, find_phi(text))
