"""Training: the one loop every run uses (``loop``), the exchange each method family plugs into it
(``exchange``), what it records and reports (``records``, ``summary``), the run's options (``config``), the
worker process and its launch, and the datasets and models it trains."""
