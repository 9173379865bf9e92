from mnist_mlflow.cli import main

main()
