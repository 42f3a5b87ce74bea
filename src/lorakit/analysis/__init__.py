"""Understanding fine-tuning rather than doing it: the calculator (shapes, params, memory, lecture),
sweeps (sweep, targets, plots), spectra (spectral, weights) and run reports (html_report, html_page, samples); the
figures of all of them in plots. The lab's write-up is in lorakit.lab, each command in lorakit.commands."""
