"""Pure preprocessing functions: CT crops and windows, DRRs, radiograph alignment and patches."""
