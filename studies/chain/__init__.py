"""The machinery of the chain study (`studies.primal_dual_chain`), shared with the lambda-limit
studies (`studies.dual_limit`, `studies.transport_encoder`):

- `settings`: the plans (quick, full), the configs read, the data;
- `generator`: the injective 2-D generator and the injectivity checks;
- `training`: building one model with its networks and training it;
- `refinement`: more critic / encoder steps against the frozen final generator;
- `evaluation`: every quantity of the chain on fixed held-out and generated samples;
- `ceiling`: the best value of the model's critic class on a Gaussian shift, without training;
- `summary`, `tables`, `plots`, `report`: from the runs to the printed tables, files and figures.
"""
