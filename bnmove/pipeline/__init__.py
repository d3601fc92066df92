"""Converting a model, stage by stage: analyse, plan, apply, calibrate, verify."""
