"""Carbon accounting: the ledger, the energy sources, FLOP counting and the stage meter.

Layers inside: `ledger` (the hash-chained record format; no torch, read by the report and the audit),
`intensity` (grid gCO2eq/kWh), `sources` (NVML and codecarbon meters), `flops` (torch's counter) and
`meter` (the context a stage runs in). Nothing here knows what a stage does.
"""
