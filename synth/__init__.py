"""Synthetic data for tests, benchmarks and the demo: not the product.

The synthetic multi-site trial (:mod:`synth.spec` what it is made of, :mod:`synth.series` its
subjects, images and headers, :mod:`synth.problems` its injected problems and ground truth,
:mod:`synth.trial` writing it), its DICOM writer (:mod:`synth.dicom_header`,
:mod:`synth.dicom_writer`), the digital phantoms and patient (:mod:`synth.shapes`,
:mod:`synth.digital_phantoms`, :mod:`synth.patient`, :mod:`synth.imaging`), scoring the
pipeline against the ground truth (:mod:`synth.truth`), and what tests and benchmarks share
(:mod:`synth.small_series`, :mod:`synth.net`, :mod:`synth.peer`).

``synth`` may import the product packages; of those, only ``flows`` (the demo and synth
commands) imports ``synth`` (``tests/test_layout.py`` checks it).
"""
