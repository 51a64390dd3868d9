"""Reading a run's rows: scaling fits, accuracy and forecast tables, claims, report, plots, compare."""
