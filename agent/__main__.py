from imgfarm.agent.main import main

raise SystemExit(main())
