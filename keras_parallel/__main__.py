import sys

from keras_parallel.cli import main

sys.exit(main())
