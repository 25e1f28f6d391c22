from imgfarm_agent.main import main

raise SystemExit(main())
