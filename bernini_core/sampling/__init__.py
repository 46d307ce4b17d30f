"""Sampling stage: flow schedulers (`schedulers`), the Bernini-R guidance modes (`guidance`) and the
full-Bernini guidance modes (`guidance_full`). Import from the submodules."""
