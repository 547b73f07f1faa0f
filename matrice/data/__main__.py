"""`python -m matrice.data --params params.yaml --out DIR`: build the dataset from the `dataset` section."""

from matrice.data.build import main

main()
