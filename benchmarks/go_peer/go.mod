module github.com/arkbatch-beam/benchmarks/go_peer

go 1.22

require github.com/volcengine/volcengine-go-sdk v1.1.35

require (
	github.com/google/uuid v1.3.0 // indirect
	github.com/jmespath/go-jmespath v0.4.0 // indirect
	github.com/volcengine/volc-sdk-golang v1.0.23 // indirect
	google.golang.org/protobuf v1.31.0 // indirect
	gopkg.in/yaml.v2 v2.2.8 // indirect
)
