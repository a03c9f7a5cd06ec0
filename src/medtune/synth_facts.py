"""Small fact tables behind medtune's synthetic MedMCQA-style questions (see medtune.synth).

Each relation is (pairs, forward question templates, backward templates, explanation). A forward
question names the key and asks for the value; a backward one names the value and asks for the
key. Distractors are drawn from the same relation, never from pairs that would also be correct.
"""

from __future__ import annotations

Relation = tuple[list[tuple[str, str]], list[str], list[str], str]


def _pairs(block: str) -> list[tuple[str, str]]:
    rows = [line.split("|") for line in block.strip().splitlines()]
    return [(k.strip(), v.strip()) for k, v in rows]


ANATOMY: list[Relation] = [
    (_pairs("""
deltoid | axillary nerve
biceps brachii | musculocutaneous nerve
serratus anterior | long thoracic nerve
diaphragm | phrenic nerve
supraspinatus | suprascapular nerve
latissimus dorsi | thoracodorsal nerve
quadriceps femoris | femoral nerve
gluteus medius | superior gluteal nerve
gluteus maximus | inferior gluteal nerve
tibialis anterior | deep peroneal nerve
adductor longus | obturator nerve
lateral rectus | abducens nerve
superior oblique | trochlear nerve
buccinator | facial nerve
genioglossus | hypoglossal nerve
trapezius | spinal accessory nerve
flexor carpi ulnaris | ulnar nerve
triceps brachii | radial nerve
"""), ["Which nerve supplies the {}?", "Nerve supply of the {} is:",
        "The {} is innervated by the:"],
     ["Which muscle is supplied by the {}?", "The {} innervates which of the following muscles?"],
     "The {key} is supplied by the {value}."),
    (_pairs("""
foramen ovale | mandibular nerve
foramen rotundum | maxillary nerve
foramen spinosum | middle meningeal artery
stylomastoid foramen | facial nerve
hypoglossal canal | hypoglossal nerve
optic canal | optic nerve
foramen magnum | medulla oblongata
superior orbital fissure | oculomotor nerve
"""), ["Which structure passes through the {}?", "The {} transmits the:"],
     ["The {} passes through which opening?"],
     "The {value} passes through the {key}."),
]

PHARMACOLOGY: list[Relation] = [
    (_pairs("""
metoprolol | beta-1 selective blocker
lisinopril | ACE inhibitor
losartan | angiotensin II receptor blocker
amlodipine | dihydropyridine calcium channel blocker
atorvastatin | HMG-CoA reductase inhibitor
omeprazole | proton pump inhibitor
furosemide | loop diuretic
hydrochlorothiazide | thiazide diuretic
spironolactone | aldosterone antagonist
warfarin | vitamin K antagonist
clopidogrel | P2Y12 inhibitor
metformin | biguanide
glipizide | sulfonylurea
sertraline | selective serotonin reuptake inhibitor
haloperidol | typical antipsychotic
diazepam | benzodiazepine
ondansetron | 5-HT3 antagonist
ciprofloxacin | fluoroquinolone
azithromycin | macrolide
"""), ["{} belongs to which drug class?", "{} is a:", "Drug class of {} is:"],
     ["Which of the following is a {}?", "An example of a {} is:"],
     "{key} is a {value}."),
    (_pairs("""
amiodarone | pulmonary fibrosis
lisinopril | dry cough
vincristine | peripheral neuropathy
doxorubicin | cardiomyopathy
cisplatin | nephrotoxicity
gentamicin | ototoxicity
chloramphenicol | gray baby syndrome
tetracycline | tooth discoloration in children
phenytoin | gingival hyperplasia
ethambutol | optic neuritis
clozapine | agranulocytosis
lithium | nephrogenic diabetes insipidus
metformin | lactic acidosis
rifampin | orange discoloration of body fluids
cyclophosphamide | hemorrhagic cystitis
"""), ["A characteristic adverse effect of {} is:", "{} is known to cause:"],
     ["Which drug is classically associated with {}?"],
     "{key} is classically associated with {value}."),
    (_pairs("""
acetaminophen overdose | N-acetylcysteine
opioid overdose | naloxone
benzodiazepine overdose | flumazenil
heparin overdose | protamine sulfate
organophosphate poisoning | atropine
methanol poisoning | fomepizole
digoxin toxicity | digoxin immune Fab
iron poisoning | deferoxamine
cyanide poisoning | hydroxocobalamin
beta blocker overdose | glucagon
"""), ["The antidote for {} is:", "Which agent is used to treat {}?"],
     ["{} is the antidote for:"],
     "{value} is the antidote for {key}."),
]

PHYSIOLOGY: list[Relation] = [
    (_pairs("""
insulin | pancreatic beta cells
glucagon | pancreatic alpha cells
cortisol | adrenal zona fasciculata
aldosterone | adrenal zona glomerulosa
renin | juxtaglomerular cells
calcitonin | thyroid parafollicular cells
parathyroid hormone | parathyroid chief cells
gastrin | G cells of the gastric antrum
secretin | S cells of the duodenum
surfactant | type II pneumocytes
intrinsic factor | gastric parietal cells
melatonin | pineal gland
"""), ["{} is secreted by:", "Which cells produce {}?", "The source of {} is:"],
     ["The {} secrete which substance?"],
     "{key} is produced by the {value}."),
    (_pairs("""
alpha-1 receptor | Gq protein (IP3/DAG)
beta-1 receptor | Gs protein (raises cAMP)
alpha-2 receptor | Gi protein (lowers cAMP)
M3 muscarinic receptor | Gq protein (IP3/DAG)
V2 receptor | Gs protein (raises cAMP)
D2 receptor | Gi protein (lowers cAMP)
insulin receptor | receptor tyrosine kinase
ANP receptor | guanylyl cyclase (cGMP)
nicotinic receptor | ligand-gated ion channel
"""), ["The {} signals through:", "Signal transduction of the {} is via:"],
     ["Which receptor signals through a {}?"],
     "The {key} acts via a {value}."),
]

PATHOLOGY: list[Relation] = [
    (_pairs("""
Reed-Sternberg cells | Hodgkin lymphoma
Auer rods | acute myeloid leukemia
Psammoma bodies | papillary thyroid carcinoma
Aschoff bodies | rheumatic heart disease
Negri bodies | rabies
Mallory-Denk bodies | alcoholic hepatitis
Lewy bodies | Parkinson disease
Call-Exner bodies | granulosa cell tumor
Schiller-Duval bodies | yolk sac tumor
Starry sky pattern | Burkitt lymphoma
Smudge cells | chronic lymphocytic leukemia
Keratin pearls | squamous cell carcinoma
Neurofibrillary tangles | Alzheimer disease
Heinz bodies | G6PD deficiency
Howell-Jolly bodies | asplenia
Michaelis-Gutmann bodies | malakoplakia
"""), ["{} are characteristic of:", "{} are seen in which condition?",
        "Histology shows {}. The diagnosis is:"],
     ["Which finding is characteristic of {}?"],
     "{key} are characteristic of {value}."),
    (_pairs("""
AFP | hepatocellular carcinoma
CA-125 | ovarian epithelial carcinoma
CA 19-9 | pancreatic adenocarcinoma
CEA | colorectal carcinoma
PSA | prostate adenocarcinoma
beta-hCG | choriocarcinoma
calcitonin | medullary thyroid carcinoma
S-100 | melanoma
"""), ["{} is a tumor marker for:", "Raised {} suggests:"],
     ["Which tumor marker is used to follow {}?"],
     "{key} is a tumor marker of {value}."),
]

MICROBIOLOGY: list[Relation] = [
    (_pairs("""
Treponema pallidum | syphilis
Borrelia burgdorferi | Lyme disease
Clostridium tetani | tetanus
Corynebacterium diphtheriae | diphtheria
Vibrio cholerae | cholera
Bordetella pertussis | whooping cough
Mycobacterium leprae | leprosy
Rickettsia rickettsii | Rocky Mountain spotted fever
Yersinia pestis | plague
Bacillus anthracis | anthrax
Salmonella Typhi | typhoid fever
Leishmania donovani | kala-azar
Trypanosoma cruzi | Chagas disease
Helicobacter pylori | peptic ulcer disease
Epstein-Barr virus | infectious mononucleosis
Coxiella burnetii | Q fever
Clostridium botulinum | botulism
"""), ["{} causes:", "Which disease is caused by {}?", "The disease caused by {} is:"],
     ["The causative agent of {} is:", "{} is caused by:"],
     "{key} causes {value}."),
    (_pairs("""
Loeffler serum slope | Corynebacterium diphtheriae
Lowenstein-Jensen medium | Mycobacterium tuberculosis
Thayer-Martin agar | Neisseria gonorrhoeae
TCBS agar | Vibrio cholerae
Bordet-Gengou agar | Bordetella pertussis
BCYE agar | Legionella pneumophila
chocolate agar | Haemophilus influenzae
Skirrow medium | Campylobacter jejuni
"""), ["{} is used to culture:", "Which organism is grown on {}?"],
     ["The culture medium of choice for {} is:"],
     "{value} is cultured on {key}."),
]

BIOCHEMISTRY: list[Relation] = [
    (_pairs("""
thiamine | beriberi
niacin | pellagra
vitamin C | scurvy
vitamin D | rickets
vitamin A | night blindness
vitamin K | bleeding diathesis
folate | neural tube defects
riboflavin | angular cheilitis
pyridoxine | sideroblastic anemia
vitamin E | hemolytic anemia and ataxia
"""), ["Deficiency of {} causes:", "{} deficiency presents as:"],
     ["{} results from deficiency of:", "Which vitamin deficiency causes {}?"],
     "{key} deficiency causes {value}."),
    (_pairs("""
phenylalanine hydroxylase | phenylketonuria
hexosaminidase A | Tay-Sachs disease
glucocerebrosidase | Gaucher disease
sphingomyelinase | Niemann-Pick disease
alpha-galactosidase A | Fabry disease
glucose-6-phosphatase | von Gierke disease
acid alpha-glucosidase | Pompe disease
muscle glycogen phosphorylase | McArdle disease
homogentisate oxidase | alkaptonuria
HGPRT | Lesch-Nyhan syndrome
arylsulfatase A | metachromatic leukodystrophy
cystathionine beta-synthase | homocystinuria
"""), ["Deficiency of {} causes:", "A defect in {} leads to:"],
     ["{} is due to deficiency of:", "The enzyme deficient in {} is:"],
     "Deficiency of {key} causes {value}."),
    (_pairs("""
glycolysis | phosphofructokinase-1
gluconeogenesis | fructose-1,6-bisphosphatase
cholesterol synthesis | HMG-CoA reductase
fatty acid synthesis | acetyl-CoA carboxylase
ketogenesis | HMG-CoA synthase
urea cycle | carbamoyl phosphate synthetase I
TCA cycle | isocitrate dehydrogenase
heme synthesis | ALA synthase
pentose phosphate pathway | glucose-6-phosphate dehydrogenase
purine synthesis | PRPP amidotransferase
"""), ["The rate-limiting enzyme of {} is:", "Which enzyme controls the rate of {}?"],
     ["{} is the rate-limiting enzyme of:"],
     "{value} is the rate-limiting enzyme of {key}."),
]

FACTS: dict[str, list[Relation]] = {
    "Anatomy": ANATOMY,
    "Pharmacology": PHARMACOLOGY,
    "Physiology": PHYSIOLOGY,
    "Pathology": PATHOLOGY,
    "Microbiology": MICROBIOLOGY,
    "Biochemistry": BIOCHEMISTRY,
}
