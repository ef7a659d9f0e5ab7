// Command go_peer is the seed's Go batch client (volcengine-go-sdk arkruntime) as a benchmark
// contender: NewClientWithApiKey + WithBaseUrl + WithTimeout, StartBatchWorker(workerNum),
// then CreateBatchChatCompletion from C goroutines until N requests are answered (or the time
// budget ends). It prints one JSON line with its figures, which benchmarks/run.py reads:
//
//	go_peer -base http://127.0.0.1:PORT/api/v3 -n 100000 -c 100 [-budget 30]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/volcengine/volcengine-go-sdk/service/arkruntime"
	"github.com/volcengine/volcengine-go-sdk/service/arkruntime/model"
	"github.com/volcengine/volcengine-go-sdk/volcengine"
)

// hist keeps latencies in log buckets (~0.5 % wide), so memory does not grow with N.
type hist struct {
	mu     sync.Mutex
	counts map[int]int
	n      int
}

const step = 0.004975165 // ln(1.01)/2

func (h *hist) add(ms float64) {
	b := int(math.Log(math.Max(ms, 1e-3)) / step)
	h.mu.Lock()
	h.counts[b]++
	h.n++
	h.mu.Unlock()
}

func (h *hist) percentile(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	keys := make([]int, 0, len(h.counts))
	for k := range h.counts {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	want := int(math.Max(1, math.Ceil(q/100*float64(h.n))))
	seen := 0
	for _, k := range keys {
		seen += h.counts[k]
		if seen >= want {
			return math.Exp((float64(k) + 0.5) * step)
		}
	}
	return 0
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func peakRSSMB() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Maxrss) / 1024 // KiB on Linux
}

func main() {
	base := flag.String("base", "", "Ark base URL, e.g. http://127.0.0.1:8080/api/v3")
	n := flag.Int("n", 10000, "requests")
	c := flag.Int("c", 100, "workerNum: requests in flight")
	budget := flag.Float64("budget", 0, "stop sending new requests after this many seconds (0 = none)")
	key := flag.String("key", "bench-key", "API key")
	flag.Parse()
	if *base == "" {
		fmt.Fprintln(os.Stderr, "-base is required")
		os.Exit(2)
	}

	client := arkruntime.NewClientWithApiKey(*key, arkruntime.WithBaseUrl(*base), arkruntime.WithTimeout(time.Hour))
	client.StartBatchWorker(*c)
	ctx := context.Background()

	h := &hist{counts: map[int]int{}}
	var next, ok, failed int64
	var wg sync.WaitGroup
	cpu0 := cpuSeconds()
	t0 := time.Now()
	stopAt := time.Time{}
	if *budget > 0 {
		stopAt = t0.Add(time.Duration(*budget * float64(time.Second)))
	}
	workers := *c
	if workers > *n {
		workers = *n
	}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1) - 1
				if i >= int64(*n) || (!stopAt.IsZero() && time.Now().After(stopAt)) {
					return
				}
				t := time.Now()
				resp, err := client.CreateBatchChatCompletion(ctx, model.ChatCompletionRequest{
					Model: "ep-bench",
					Messages: []*model.ChatCompletionMessage{{
						Role:    model.ChatMessageRoleUser,
						Content: &model.ChatCompletionMessageContent{StringValue: volcengine.String(fmt.Sprintf("prompt %d", i))},
					}},
				})
				h.add(float64(time.Since(t).Microseconds()) / 1000)
				if err != nil || len(resp.Choices) == 0 {
					atomic.AddInt64(&failed, 1)
					continue
				}
				atomic.AddInt64(&ok, 1)
			}
		}()
	}
	wg.Wait()
	wall := time.Since(t0).Seconds()
	cpu := cpuSeconds() - cpu0
	out := map[string]any{
		"completed":      ok,
		"failed":         failed,
		"wall_s":         math.Round(wall*1000) / 1000,
		"req_per_s":      math.Round(float64(ok)/wall*10) / 10,
		"cpu_s":          math.Round(cpu*1000) / 1000,
		"cpu_us_per_req": math.Round(cpu/math.Max(1, float64(ok))*1e7) / 10,
		"req_per_cpu_s":  math.Round(float64(ok)/math.Max(cpu, 1e-9)*10) / 10,
		"peak_rss_mb":    math.Round(peakRSSMB()*10) / 10,
		"p50_ms":         math.Round(h.percentile(50)*1000) / 1000,
		"p99_ms":         math.Round(h.percentile(99)*1000) / 1000,
	}
	b, _ := json.Marshal(out)
	fmt.Println("BENCH_RESULT " + string(b))
}
