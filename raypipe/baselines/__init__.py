"""Clinical baselines of the X-ray branch (papers/001): CoxPH on the clinical models' variables."""
