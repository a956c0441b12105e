"""Clinical variables, planted image features and Cox (Weibull) outcomes of one synthetic patient.

Everything here is pure numpy and documented in ``docs/synthetic_cohort.md``; the constants below are the
generative model (change them there too). One patient is drawn from one ``numpy.random.Generator``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LUMBAR_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")

# Site-specific marginals, after Kong et al. 2024 (Table 1: development vs external validation set).
SITE_PROB_A = 0.7
SITE_PARAMS: dict[str, dict[str, float]] = {
    "A": {"age_mean": 70.0, "female": 0.69, "smoker": 0.20, "alcohol": 0.19, "glucocorticoid": 0.13,
          "secondary_osteoporosis": 0.10},
    "B": {"age_mean": 66.0, "female": 0.79, "smoker": 0.06, "alcohol": 0.07, "glucocorticoid": 0.115,
          "secondary_osteoporosis": 0.03},
}
AGE_SD, AGE_MIN, AGE_MAX = 8.0, 50.0, 85.0
OTHER_PREVALENCE = {"rheumatoid_arthritis": 0.04, "t2dm": 0.20, "hiv": 0.005, "hcv": 0.02,
                    "renal_failure": 0.05}

# Planted image features: reference means/SDs used to standardise them in the linear predictor.
DENSITY_REF_MEAN, DENSITY_REF_SD = 130.0, 35.0        # trabecular HU
FAT_REF_MEAN, FAT_REF_SD = 0.20, 0.08                 # paravertebral muscle fat fraction
DENSITY_MIN, DENSITY_MAX = 60.0, 250.0
FAT_MIN, FAT_MAX = 0.02, 0.50
GENANT_GRADE1 = 0.20                                  # wedge fraction that counts as a prevalent fracture

# Cox model: log-hazard ratios (per unit of the stated covariate).
COX_BETA: dict[str, float] = {
    "density_z": -0.70,         # (bone_density_hu - 130) / 35
    "fat_z": 0.45,              # (muscle_fat_fraction - 0.20) / 0.08
    "deformity": 4.0,           # worst wedge fraction of L1-L5 (0 .. 0.5)
    "age_10y": 0.35,            # (age - 68) / 10
    "female": 0.30,
    "bmi_5": -0.15,             # (bmi - 24) / 5
    "glucocorticoid": 0.60,
    "prior_fracture": 0.50,
}
IMAGE_TERMS = {"ct": ("density_z", "fat_z", "deformity"), "xray": ("density_z", "deformity")}
# Weibull baseline: H0(t) = (t / WEIBULL_SCALE_DAYS) ** WEIBULL_SHAPE; T = scale * (E exp(-lp)) ** (1/shape).
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_DAYS = 12000.0
LP_CENTRE = 1.06            # subtracted from lp (population mean of the raw lp), so lp ~ 0 on average
ADMIN_CENSOR_DAYS = 3652    # 10 years
DROPOUT_MEAN_DAYS = 15.0 * 365.25   # exponential loss to follow-up
HORIZON_5Y_DAYS = 1826


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: clinical columns, planted features, and outcome."""
    patient_id: str
    site: str
    age: float
    sex: str
    height_cm: float
    weight_kg: float
    bmi: float
    smoker: int
    alcohol: int
    glucocorticoid: int
    secondary_osteoporosis: int
    rheumatoid_arthritis: int
    prior_fracture: int
    t2dm: int
    hiv: int
    hcv: int
    renal_failure: int
    frax_mof: float
    frax_hip: float
    bone_density_hu: float
    muscle_fat_fraction: float
    wedge: dict[str, float]          # L1..L5 anterior wedge fraction (0 = normal)
    deformity: float                 # max wedge over L1-L5
    prevalent_fracture: int          # any wedge >= GENANT_GRADE1
    true_lp: float
    true_clinical_lp: float
    image_lp: dict[str, float]       # image part per modality ("ct", "xray")
    time_days: int
    event: int
    fracture_5y: float               # 1 / 0 / NaN (censored before 5 years without event)

    def row(self) -> dict[str, object]:
        """Manifest columns shared by all studies of this patient."""
        d = asdict(self)
        for k in ("wedge", "image_lp"):
            d.pop(k)
        return d


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def frax_like(age: float, female: int, bmi: float, prior: int, gc: int, ra: int, sec: int, smoker: int,
              alcohol: int) -> tuple[float, float]:
    """Monotone FRAX-like 10-year probabilities (%) of major osteoporotic and hip fracture (no BMD)."""
    risk = (0.6 * prior + 0.5 * gc + 0.35 * ra + 0.3 * sec + 0.2 * smoker + 0.2 * alcohol)
    mof = 100 * _sigmoid(-2.6 + 0.07 * (age - 65) + 0.6 * female - 0.05 * (bmi - 24) + risk)
    hip = 100 * _sigmoid(-4.0 + 0.10 * (age - 65) + 0.4 * female - 0.08 * (bmi - 24) + 1.1 * risk)
    return round(mof, 2), round(hip, 2)


def cox_terms(age: float, female: int, bmi: float, gc: int, prior: int, density: float, fat: float,
              deformity: float) -> dict[str, float]:
    """Covariates of the Cox model (before multiplication by ``COX_BETA``)."""
    return {
        "density_z": (density - DENSITY_REF_MEAN) / DENSITY_REF_SD,
        "fat_z": (fat - FAT_REF_MEAN) / FAT_REF_SD,
        "deformity": deformity,
        "age_10y": (age - 68.0) / 10.0,
        "female": float(female),
        "bmi_5": (bmi - 24.0) / 5.0,
        "glucocorticoid": float(gc),
        "prior_fracture": float(prior),
    }


def weibull_time(lp: float, e: float) -> float:
    """Event time (days) of a Cox model with Weibull baseline, from a unit exponential draw ``e``."""
    return WEIBULL_SCALE_DAYS * (e * math.exp(-lp)) ** (1.0 / WEIBULL_SHAPE)


def _truncnorm(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    for _ in range(1000):
        v = rng.normal(mean, sd)
        if lo <= v <= hi:
            return float(v)
    return float(np.clip(mean, lo, hi))


def draw_patient(rng: np.random.Generator, patient_id: str) -> Patient:
    """Draw clinical variables, planted image features and a (time, event) outcome for one patient."""
    site = "A" if rng.random() < SITE_PROB_A else "B"
    sp = SITE_PARAMS[site]
    age = round(_truncnorm(rng, sp["age_mean"], AGE_SD, AGE_MIN, AGE_MAX), 1)
    female = int(rng.random() < sp["female"])
    height = round(_truncnorm(rng, 155.0 if female else 168.0, 6.5, 135.0, 195.0), 1)
    bmi_draw = _truncnorm(rng, 23.8, 3.5, 15.0, 40.0)
    weight = round(bmi_draw * (height / 100) ** 2, 1)
    bmi = round(weight / (height / 100) ** 2, 2)
    b = lambda p: int(rng.random() < p)  # noqa: E731
    smoker = b(sp["smoker"] * (0.6 if female else 2.0))
    alcohol = b(sp["alcohol"] * (0.6 if female else 2.0))
    gc = b(sp["glucocorticoid"])
    sec = b(sp["secondary_osteoporosis"])
    other = {k: b(p) for k, p in OTHER_PREVALENCE.items()}

    # Latent bone density (trabecular HU) falls with age, female sex, glucocorticoids, low BMI.
    dens_mean = (150.0 - 2.2 * (age - 65) - 20.0 * female + 2.0 * (bmi - 24) - 15.0 * gc - 10.0 * sec
                 - 5.0 * smoker)
    density = round(_truncnorm(rng, dens_mean, 28.0, DENSITY_MIN, DENSITY_MAX), 2)
    fat_mean = 0.17 + 0.006 * (age - 65) + 0.008 * (bmi - 24) + 0.03 * female + 0.03 * other["t2dm"]
    fat = round(_truncnorm(rng, fat_mean, 0.07, FAT_MIN, FAT_MAX), 4)

    # Prevalent deformities: more likely with low density.
    wedge = {lv: round(float(rng.uniform(0.0, 0.08)), 4) for lv in LUMBAR_LEVELS}
    p_frac = _sigmoid(-2.0 - 0.035 * (density - DENSITY_REF_MEAN) + 0.4 * gc)
    if rng.random() < p_frac:
        n_frac = 1 if rng.random() < 0.7 else 2
        levels = rng.choice(len(LUMBAR_LEVELS), size=n_frac, replace=False,
                            p=np.array([0.35, 0.25, 0.18, 0.12, 0.10]))
        for li in levels:
            wedge[LUMBAR_LEVELS[int(li)]] = round(float(rng.uniform(GENANT_GRADE1, 0.45)), 4)
    deformity = max(wedge.values())
    prevalent = int(deformity >= GENANT_GRADE1)
    prior = b(_sigmoid(-2.4 - 0.02 * (density - DENSITY_REF_MEAN) + 1.0 * prevalent))
    mof, hip = frax_like(age, female, bmi, prior, gc, other["rheumatoid_arthritis"], sec, smoker, alcohol)

    terms = cox_terms(age, female, bmi, gc, prior, density, fat, deformity)
    contrib = {k: COX_BETA[k] * v for k, v in terms.items()}
    lp = sum(contrib.values()) - LP_CENTRE
    image_all = sum(contrib[k] for k in ("density_z", "fat_z", "deformity"))
    image_lp = {m: round(sum(contrib[k] for k in ks), 6) for m, ks in IMAGE_TERMS.items()}

    t_event = weibull_time(lp, float(rng.exponential()))
    t_drop = float(rng.exponential(DROPOUT_MEAN_DAYS))
    t_cens = min(float(ADMIN_CENSOR_DAYS), t_drop)
    event = int(t_event <= t_cens)
    time_days = max(1, int(math.ceil(min(t_event, t_cens))))
    if event and time_days <= HORIZON_5Y_DAYS:
        f5: float = 1.0
    elif time_days > HORIZON_5Y_DAYS:
        f5 = 0.0
    else:
        f5 = float("nan")
    return Patient(
        patient_id=patient_id, site=site, age=age, sex="F" if female else "M", height_cm=height,
        weight_kg=weight, bmi=bmi, smoker=smoker, alcohol=alcohol, glucocorticoid=gc,
        secondary_osteoporosis=sec, rheumatoid_arthritis=other["rheumatoid_arthritis"],
        prior_fracture=prior, t2dm=other["t2dm"], hiv=other["hiv"], hcv=other["hcv"],
        renal_failure=other["renal_failure"], frax_mof=mof, frax_hip=hip, bone_density_hu=density,
        muscle_fat_fraction=fat, wedge=wedge, deformity=deformity, prevalent_fracture=prevalent,
        true_lp=round(lp, 6), true_clinical_lp=round(lp - image_all, 6), image_lp=image_lp,
        time_days=time_days, event=event, fracture_5y=f5,
    )
