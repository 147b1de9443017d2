from .world import main

main()
