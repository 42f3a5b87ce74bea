"""Understanding fine-tuning rather than doing it: the calculator (shapes, params, memory, lecture),
sweeps (sweep, targets, plots), spectra (spectral, weights), run reports (html_report) and the lab
write-up (labrun, labclaims, labdoc). Each command module lives in lorakit.commands."""
