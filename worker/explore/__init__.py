"""The explorer: a local web page over a job's output and its audit (``guided-saliency view OUTPUT``).

Slices (:mod:`~worker.explore.slices`) are answered where the data lies, over the part files; pictures
(:mod:`~worker.explore.pictures`) are made only for the rows on screen, their images read back from the input by id;
the audit's views (:mod:`~worker.explore.findings`) link each finding to its rows; :mod:`~worker.explore.server`
serves the page.
"""
