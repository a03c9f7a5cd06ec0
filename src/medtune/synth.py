"""Synthetic data of medtune's own: clinical-order notes -> imaging protocol, and MedMCQA-style
questions built from small fact tables. Used by the demo, the tests and base-model pretraining.

Everything here is invented from the tables below. Notes are built so that no single keyword
decides the protocol: symptoms are shared across protocols (flank pain: CT Urography, Renal Stone,
CT A/P, US Renal), pertinent negatives mention other protocols' findings ("no hematuria"), and a
few notes carry only shared symptoms. The combination of findings, history and reason decides.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from medtune.errors import MedtuneError
from medtune.fsutil import atomic_file, check_output_file
from medtune.synth_facts import FACTS

# Shared symptom groups: a protocol draws its presenting complaint from one or more of these.
SHARED: dict[str, str] = {
    "headache": "headache|HA|severe headache|headaches|frontal headache|new headache",
    "neuro": "weakness|numbness|dizziness|confusion|AMS|vision changes|gait instability",
    "trauma": "s/p fall|s/p MVC|fall from standing|trauma|assault|ground level fall",
    "chest": "chest pain|CP|chest tightness|chest pressure",
    "sob": "SOB|shortness of breath|dyspnea|DOE|dyspnea on exertion",
    "cough": "cough|chronic cough|productive cough|persistent cough",
    "flank": "flank pain|R flank pain|L flank pain|CVA tenderness|flank tenderness",
    "hematuria": "hematuria|blood in urine|microscopic hematuria",
    "abd": "abdominal pain|abd pain|epigastric pain|N/V|nausea and vomiting|bloating",
    "back": "back pain|midline back pain|back tenderness|mid back pain",
    "neck": "neck pain|neck stiffness|neck swelling|neck tenderness",
    "face": "facial pain|facial swelling|jaw pain|pain over cheek",
    "ear": "hearing loss|tinnitus|ear pain|vertigo|ear fullness",
    "joint": "joint pain|swelling|limited ROM|pain with movement|instability",
    "pelvic": "pelvic pain|lower abd pain|RLQ pain|LLQ pain",
    "gi": "weight loss|jaundice|elevated LFTs|anemia|early satiety",
    "fever": "fever|fevers|chills|leukocytosis",
}

# name: (shared groups, specific findings, specific history, reason for exam, pertinent negatives,
#        age range, sexes). Strings are '|'-separated choices.
PROFILES: dict[str, tuple[str, str, str, str, str, tuple[int, int], str]] = {
    "CT Head without contrast": (
        "headache trauma neuro",
        "head strike|LOC|GCS 14|scalp hematoma|on anticoagulation|syncope with head injury|"
        "thunderclap onset",
        "warfarin use|afib on apixaban|prior SDH|dementia",
        "r/o ICH|r/o bleed|eval intracranial hemorrhage|r/o SDH",
        "vomiting|LOC|focal deficits", (18, 89), "MF"),
    "MRI Brain with and without contrast": (
        "headache neuro ear",
        "new onset seizure|known glioma|MS flare|optic neuritis|visual field cut|"
        "enhancing lesion on CT|papilledema",
        "breast ca|melanoma|multiple sclerosis|lung ca on chemo",
        "eval mets|eval demyelination|f/u brain tumor|r/o mass",
        "fever|trauma|neck stiffness", (18, 80), "MF"),
    "CTA Head/Neck": (
        "neuro headache neck",
        "facial droop|aphasia|slurred speech|arm drift|carotid bruit|amaurosis fugax|"
        "code stroke",
        "TIA last month|carotid stenosis|afib off anticoagulation",
        "r/o stroke|eval LVO|eval carotid stenosis|r/o dissection",
        "trauma|fever|headache", (40, 89), "MF"),
    "CT Brain Perfusion": (
        "neuro",
        "NIHSS 14|LKW 8 hrs|wake-up stroke|large vessel occlusion|thrombectomy candidate|"
        "penumbra assessment|outside tPA window",
        "prior stroke|afib|carotid stenting",
        "r/o stroke|eval penumbra|eval core infarct|stroke workup",
        "headache|trauma|seizure", (45, 89), "MF"),
    "Pulmonary Embolus": (
        "chest sob cough",
        "pleuritic chest pain|tachycardia|elevated d-dimer|hypoxia|unilateral leg swelling|"
        "hemoptysis|recent long flight|calf pain",
        "recent surgery|on OCPs|prior DVT|active malignancy",
        "r/o PE|eval pulmonary embolism|? PE|high Wells score",
        "fever|trauma|cough", (18, 85), "MF"),
    "CT Chest with contrast": (
        "cough sob fever chest",
        "lung mass on CXR|hilar adenopathy|pleural effusion|empyema|mediastinal widening on CXR|"
        "lung nodule growth",
        "smoker 40 pack-years|lung ca staging|lymphoma",
        "eval mass|staging|eval effusion|r/o empyema",
        "hemoptysis|leg swelling|d-dimer", (30, 85), "MF"),
    "HRCT Chest (Interstitial Lung Disease)": (
        "sob cough",
        "velcro crackles|progressive dyspnea over months|clubbing|reticular opacities on CXR|"
        "low DLCO|restrictive PFTs",
        "rheumatoid arthritis|scleroderma|amiodarone use|pulmonary fibrosis|asbestos exposure",
        "eval ILD|eval fibrosis|r/o UIP|ILD f/u",
        "fever|chest pain|hemoptysis", (40, 85), "MF"),
    "CTA Aortic Dissection": (
        "chest back",
        "tearing chest pain|pain radiating to back|BP differential between arms|"
        "pulse deficit|widened mediastinum|sudden severe pain",
        "Marfan syndrome|uncontrolled HTN|bicuspid aortic valve|known TAA",
        "r/o dissection|r/o aortic dissection|eval aorta|? dissection",
        "leg swelling|fever|cough", (35, 85), "MF"),
    "CT Abdomen/Pelvis with contrast": (
        "abd pelvic fever flank",
        "RLQ tenderness|rebound tenderness|LLQ tenderness|guarding|distension|"
        "no bowel movement|peritoneal signs",
        "diverticulitis|crohns|prior bowel surgery|appendectomy",
        "r/o appendicitis|r/o diverticulitis|r/o abscess|r/o SBO",
        "hematuria|dysuria|jaundice", (18, 85), "MF"),
    "CT Urography": (
        "hematuria flank",
        "gross hematuria|painless hematuria|clots in urine|bladder mass on US|"
        "hydronephrosis on US|positive urine cytology",
        "bladder ca surveillance|urothelial ca|smoker|cyclophosphamide use",
        "hematuria workup|eval urothelial tumor|eval collecting system|r/o TCC",
        "fever|trauma|dysuria", (40, 89), "MF"),
    "Renal Stone Protocol": (
        "flank hematuria back abd",
        "colicky pain|pain radiating to groin|writhing in pain|intermittent severe pain|"
        "unable to sit still",
        "kidney stones|nephrolithiasis|gout|prior lithotripsy",
        "r/o stone|r/o nephrolithiasis|eval ureteral stone|? stone",
        "fever|gross hematuria|trauma", (18, 75), "MF"),
    "CT Pancreas": (
        "abd gi back",
        "elevated lipase|epigastric pain radiating to back|painless jaundice|"
        "pancreatic mass on US|dilated pancreatic duct|elevated CA 19-9",
        "alcohol use|pancreatitis|gallstone pancreatitis|IPMN",
        "eval pancreatitis|r/o pancreatic mass|eval pseudocyst|pancreas protocol",
        "hematuria|fever|chest pain", (30, 85), "MF"),
    "CT Liver Multiphase": (
        "gi abd",
        "elevated AFP|liver lesion on US|hepatomegaly|ascites|new liver mass",
        "cirrhosis|hepatitis C|hepatitis B|NASH|HCC s/p ablation",
        "eval HCC|characterize liver lesion|HCC screening|LI-RADS f/u",
        "fever|hematuria|back pain", (35, 85), "MF"),
    "CT Colonography": (
        "gi abd",
        "incomplete colonoscopy|positive FIT|iron deficiency|change in bowel habits|"
        "declines optical colonoscopy",
        "family hx colon ca|polyps|diverticulosis",
        "colon ca screening|eval polyps|virtual colonoscopy|screening",
        "fever|vomiting|rebound", (45, 85), "MF"),
    "C-Spine": (
        "neck trauma neuro",
        "midline cervical tenderness|arm paresthesias|neck pain after MVC|"
        "C5-C6 radiculopathy|cannot rotate neck|hit by car",
        "cervical spondylosis|ACDF|rheumatoid arthritis",
        "r/o cervical fx|r/o c-spine fracture|eval cervical spine|NEXUS positive",
        "headache|LOC|fever", (18, 89), "MF"),
    "T-Spine": (
        "back trauma",
        "thoracic tenderness|T8 point tenderness|kyphosis|rib pain|compression fx on CXR|"
        "mid thoracic pain",
        "osteoporosis|steroid use|myeloma|prior T12 fx",
        "r/o thoracic fx|eval compression fracture|eval t-spine|r/o T-spine fx",
        "leg weakness|incontinence|fever", (30, 89), "MF"),
    "L-Spine": (
        "back trauma neuro",
        "LBP|sciatica|radiating down leg|saddle anesthesia|foot drop|"
        "L4-L5 disc herniation|positive SLR",
        "s/p L4-L5 fusion|lumbar stenosis|laminectomy|DDD",
        "eval radiculopathy|r/o cord compression|r/o cauda equina|eval lumbar spine",
        "fever|hematuria|chest pain", (18, 85), "MF"),
    "Maxillofacial": (
        "face trauma",
        "orbital swelling|malocclusion|jaw deformity|periorbital ecchymosis|"
        "nasal deformity|trismus|punched in face",
        "prior facial fx|orbital floor repair",
        "r/o facial fx|r/o orbital fracture|r/o mandible fx|eval facial bones",
        "LOC|neck pain|vision loss", (18, 70), "MF"),
    "CT Sinus": (
        "face headache",
        "nasal congestion|purulent nasal discharge|sinus pressure|anosmia|nasal polyps|"
        "postnasal drip",
        "chronic sinusitis|allergic rhinitis|prior FESS",
        "eval sinusitis|pre-op FESS|eval chronic sinus disease|r/o sinusitis",
        "trauma|fever|vision changes", (18, 75), "MF"),
    "Temporal Bones": (
        "ear",
        "conductive hearing loss|otorrhea|cholesteatoma|retracted TM|"
        "cochlear implant candidate|chronic ear drainage",
        "chronic otitis media|tympanoplasty|mastoidectomy",
        "eval cholesteatoma|eval ossicles|pre-op cochlear implant|eval mastoid",
        "headache|weakness|trauma", (5, 80), "MF"),
    "Soft Tissue Neck": (
        "neck fever face",
        "odynophagia|dysphagia|neck mass|muffled voice|trismus and fever|"
        "palpable lymph node|drooling",
        "tonsillitis|head and neck ca|thyroid nodule",
        "r/o peritonsillar abscess|eval neck mass|r/o abscess|eval lymphadenopathy",
        "trauma|chest pain|weakness", (5, 80), "MF"),
    "US Renal": (
        "flank hematuria",
        "elevated creatinine|AKI|decreased urine output|renal function decline|"
        "recurrent UTI|palpable kidney",
        "CKD stage 3|renal transplant|polycystic kidney|diabetic nephropathy",
        "eval hydronephrosis|eval kidneys|r/o obstruction|AKI workup",
        "fever|gross hematuria|trauma", (1, 89), "MF"),
    "US Abdomen RUQ": (
        "abd gi fever",
        "RUQ pain|positive Murphy sign|pain after fatty meals|biliary colic|"
        "elevated alk phos|RUQ tenderness",
        "gallstones|obesity|pregnancy last year",
        "r/o cholecystitis|eval gallbladder|r/o gallstones|eval biliary dilation",
        "hematuria|chest pain|back pain", (18, 80), "MF"),
    "US Pelvis": (
        "pelvic abd",
        "vaginal bleeding|positive hCG|adnexal mass|menorrhagia|ovarian cyst|"
        "enlarged uterus on exam",
        "fibroids|endometriosis|PCOS|IUD in place",
        "r/o ectopic|eval ovarian torsion|eval fibroids|r/o ovarian cyst",
        "fever|hematuria|back pain", (15, 60), "F"),
    "MRI Knee": (
        "joint trauma",
        "knee effusion|knee locking|twisting injury|ACL laxity|medial joint line tenderness|"
        "knee giving way",
        "prior ACL repair|meniscectomy|osteoarthritis knee",
        "r/o meniscal tear|eval ACL|eval internal derangement|r/o ligament tear",
        "fever|back pain|numbness", (14, 70), "MF"),
    "MRI Shoulder": (
        "joint trauma",
        "shoulder pain|weak abduction|positive impingement test|shoulder dislocation|"
        "painful arc|cannot lift arm",
        "rotator cuff repair|prior dislocation|frozen shoulder",
        "r/o rotator cuff tear|eval labrum|eval rotator cuff|r/o labral tear",
        "fever|neck pain|numbness", (18, 80), "MF"),
}
PROTOCOLS: list[str] = list(PROFILES)

MIN_CHARS, MAX_CHARS = 60, 250  # notes stay short so tiny models train fast
GENERIC_HX = "HTN|DM2|HLD|CAD|COPD|obesity|hypothyroidism|GERD|asthma|depression|smoker|CKD"
DURATIONS = ["x 2 days", "x1 wk", "for 3 days", "since yesterday", "for 2 weeks", "x 3 months",
             "since this AM", "for several days", "acute onset", "x 4 hrs", "worsening"]
NEGATIONS = ["no {}", "denies {}", "neg for {}", "without {}", "no h/o {}"]
SEX_WORDS = {"M": ["M", "male", "man", "M", "yo M"], "F": ["F", "female", "woman", "F", "yo F"]}


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]


def _opts(s: str) -> list[str]:
    return s.split("|")


def _demo(rng: random.Random, lo: int, hi: int, sexes: str) -> str:
    age, sex = rng.randint(lo, hi), rng.choice(sexes)
    word = rng.choice(SEX_WORDS[sex])
    if word.startswith("yo"):
        return f"{age} {word}"
    forms = [f"{age} yo {word}", f"{age}{sex}", f"{age} y.o. {word}", f"{age} year old {word}",
             f"pt is a {age}yo {sex}", f"{age}-year-old {word}", f"{age} y/o {sex}"]
    return rng.choice(forms)


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    sep = rng.choice([", ", " and ", ", ", " + "])
    return ", ".join(items[:-1]) + sep + items[-1]


def _typos(text: str, rng: random.Random, rate: float = 0.015) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) >= 5 and w.isalpha() and rng.random() < rate:
            j = rng.randrange(1, len(w) - 1)
            kind = rng.random()
            if kind < 0.4:  # swap two neighbouring characters
                w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            elif kind < 0.8:  # drop a character
                w = w[:j] + w[j + 1:]
            else:  # double a character
                w = w[:j] + w[j] + w[j:]
            words[i] = w
    return " ".join(words)


def _siblings(name: str) -> list[str]:
    groups = set(PROFILES[name][0].split())
    return [p for p in PROTOCOLS if p != name and groups & set(PROFILES[p][0].split())]


def _note(name: str, rng: random.Random) -> str:
    groups, cues, hx, why, negs, (lo, hi), sexes = PROFILES[name]
    grp = groups.split()
    findings = [rng.choice(_opts(SHARED[rng.choice(grp)]))]
    if rng.random() < 0.35:
        findings.append(rng.choice(_opts(SHARED[rng.choice(grp)])))
    k = rng.choices([0, 1, 2], weights=[0.15, 0.65, 0.2])[0]
    findings += rng.sample(_opts(cues), k)
    if rng.random() < 0.08 and (sib := _siblings(name)):  # a finding typical of a neighbour
        findings.append(rng.choice(_opts(PROFILES[rng.choice(sib)][1])))
    findings = list(dict.fromkeys(findings))
    rng.shuffle(findings)
    history = []
    if rng.random() < 0.35:
        history.append(rng.choice(_opts(hx)))
    if rng.random() < 0.4:
        history.append(rng.choice(_opts(GENERIC_HX)))
    rng.shuffle(history)
    reason = rng.choice(_opts(why)) if rng.random() < 0.5 else ""
    neg = ""
    if rng.random() < 0.35:
        neg = rng.choice(NEGATIONS).format(rng.choice(_opts(negs)))
    dur = rng.choice(DURATIONS) if rng.random() < 0.5 else ""

    demo = _demo(rng, lo, hi, sexes)
    sym = _join(findings, rng) + (f" {dur}" if dur else "")
    hxs = ("h/o " if rng.random() < 0.5 else "hx ") + ", ".join(history) if history else ""
    style = rng.randrange(5)
    if style == 0:
        parts = [f"{demo} with {hxs}" if hxs else demo, f"presents with {sym}", neg, reason]
    elif style == 1:
        parts = [demo, sym, hxs, neg, reason]
    elif style == 2:
        parts = [f"Reason for exam: {reason or sym}", demo, sym if reason else "", hxs, neg]
    elif style == 3:
        parts = [f"{demo} c/o {sym}", hxs, neg, f"please {reason}" if reason else ""]
    else:
        parts = [f"Indication: {sym}", f"{demo}, {hxs}" if hxs else demo, neg, reason]
    parts = [p for p in parts if p]
    sep = rng.choice([". ", ". ", "; ", ", "])
    text = sep.join(parts)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    text = _typos(text, rng)
    while len(text) < MIN_CHARS:
        text += f"{sep}{rng.choice(['pt', 'patient'])} {rng.choice(['reports', 'notes'])} " \
                f"{rng.choice(_opts(SHARED[rng.choice(grp)]))} {rng.choice(DURATIONS)}"
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def _class_weights(imbalance: float) -> list[float]:
    if imbalance < 0:
        raise MedtuneError(f"imbalance: must be >= 0, got {imbalance}")
    # Zipf-Mandelbrot: weight = (rank + 4) ** -imbalance; at 1.0 the most frequent class is
    # (25 + 4) / 4 = 7.25x the rarest of the 26, a mild imbalance; 0 is uniform.
    # relative to the largest (4 ** -imbalance underflows to 0 for every class past ~500)
    return [((rank + 4.0) / 4.0) ** -imbalance for rank in range(len(PROTOCOLS))]


def _labels(n: int, rng: random.Random, imbalance: float) -> list[str]:
    weights = _class_weights(imbalance)
    if n >= 3 * len(PROTOCOLS):  # every label at least once, the rest by Zipf-like weight
        labels = list(PROTOCOLS) + rng.choices(PROTOCOLS, weights=weights, k=n - len(PROTOCOLS))
        rng.shuffle(labels)
        return labels
    return rng.choices(PROTOCOLS, weights=weights, k=n)


def synth_protocol(n: int, *, seed: int = 0, imbalance: float = 1.0,
                   label_noise: float = 0.0) -> pd.DataFrame:
    """``n`` synthetic clinical-order notes with their imaging protocol (columns id, text, label).

    imbalance: Zipf-Mandelbrot exponent of class frequencies in PROTOCOLS order (0 = uniform,
    1 = the first class about 7x the last).
    label_noise: fraction of rows (exactly round(n * label_noise)) whose label is replaced by a
    different random label; the texts are the same as with label_noise=0.
    """
    if n < 0:
        raise MedtuneError(f"n: must be >= 0, got {n}")
    if not 0.0 <= label_noise <= 1.0:
        raise MedtuneError(f"label_noise: must be in [0, 1], got {label_noise}")
    rng = random.Random(seed)
    labels = _labels(n, rng, imbalance)
    texts = [_note(label, rng) for label in labels]
    noise_rng = random.Random(f"label-noise:{seed}")
    for i in noise_rng.sample(range(n), round(n * label_noise)):
        labels[i] = noise_rng.choice([p for p in PROTOCOLS if p != labels[i]])
    ids = [f"synth-{seed}-{i:06d}" for i in range(n)]
    return pd.DataFrame({"id": ids, "text": texts, "label": labels})


def synth_unlabelled(n: int, *, seed: int = 0) -> list[str]:
    """Unlabelled notes (base-model pretraining), from a stream separate from synth_protocol's."""
    rng = random.Random(f"unlabelled:{seed}")
    return [_note(label, rng) for label in _labels(n, rng, 0.5)]


def synth_mcqa(n: int, *, seed: int = 0) -> pd.DataFrame:
    """``n`` MedMCQA-shaped questions from the fact tables; the answer position is uniform."""
    if n < 0:
        raise MedtuneError(f"n: must be >= 0, got {n}")
    rng = random.Random(f"mcqa:{seed}")
    rows = []
    relations = [(subj, rel) for subj, rels in FACTS.items() for rel in rels]
    for i in range(n):
        subject, (pairs, forward, backward, explain) = rng.choice(relations)
        key, value = rng.choice(pairs)
        if backward and rng.random() < 0.4:  # ask for the key given the value
            question = rng.choice(backward).format(value)
            answer = key
            pool = sorted({k for k, v in pairs if v != value})
        else:
            question = rng.choice(forward).format(key)
            answer = value
            pool = sorted({v for k, v in pairs if v != value})
        question = question[0].upper() + question[1:]
        options = rng.sample(pool, 3)
        cop = rng.randrange(4)
        options.insert(cop, answer)
        rows.append({"id": f"mcqa-{seed}-{i:06d}", "question": question,
                     "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
                     "cop": cop, "subject_name": subject, "choice_type": "single",
                     "exp": _capital(explain.format(key=key, value=value))})
    columns = ["id", "question", "opa", "opb", "opc", "opd", "cop", "subject_name",
               "choice_type", "exp"]
    return pd.DataFrame(rows, columns=columns).astype({"cop": int})


def write_table_by_extension(df: pd.DataFrame, tmp: Path, suffix: str) -> None:
    """Write ``df`` to ``tmp`` in the format named by ``suffix`` (.csv, .jsonl, .parquet)."""
    if suffix == ".csv":
        df.to_csv(tmp, index=False)
    elif suffix == ".jsonl":
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    elif suffix in (".parquet", ".pq"):
        df.to_parquet(tmp, index=False)
    else:
        raise MedtuneError(f"unsupported extension {suffix!r} (use .csv, .jsonl or .parquet)")


def write_synth(task: str, n: int, output: str | Path, *, seed: int = 0, imbalance: float = 1.0,
                label_noise: float = 0.0, overwrite: bool = False) -> Path:
    """Generate ``n`` rows of ``task`` ('protocol' or 'mcqa') and write them atomically."""
    if task not in ("protocol", "mcqa"):
        raise MedtuneError(f"task: must be 'protocol' or 'mcqa', got {task!r}")
    output = check_output_file(output, overwrite)
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".parquet", ".pq"):
        raise MedtuneError(f"{output}: unsupported extension (use .csv, .jsonl or .parquet)")
    if task == "protocol":
        df = synth_protocol(n, seed=seed, imbalance=imbalance, label_noise=label_noise)
    else:
        df = synth_mcqa(n, seed=seed)
    with atomic_file(output) as tmp:
        write_table_by_extension(df, tmp, suffix)
    return output
