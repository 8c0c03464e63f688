"""Front ends beyond one machine, on Ray: `rmbg remove --ray` (Ray Data, `job`) and `rmbg serve` (Ray Serve,
`serve`). They take the same `RemovalOptions` and `BatchRun` as the plain CLI; the command line itself
lives in `rmbg_demo.cli`.

Importing this package does not import Ray; the entry points do, and say which extra to install
(`pip install 'rmbg-demo[ray]'`) when it is missing."""
