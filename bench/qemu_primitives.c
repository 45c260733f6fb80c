// Per-page primitive costs as QEMU 7.2's postcopy uses them (local measurement).
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <poll.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <time.h>
#include <errno.h>
#include <immintrin.h>

static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define PG 4096UL

__attribute__((target("avx2"))) static int zero_avx2(const void *buf, size_t len){
    __m256i t = _mm256_loadu_si256(buf);
    __m256i *p = (__m256i *)(((uintptr_t)buf + 5 * 32) & -32);
    __m256i *e = (__m256i *)(((uintptr_t)buf + len) & -32);
    while (p <= e) { __builtin_prefetch(p); if (!_mm256_testz_si256(t, t)) return 0;
        t = p[-4] | p[-3] | p[-2] | p[-1]; p += 4; }
    t |= _mm256_loadu_si256(buf + len - 4 * 32); t |= _mm256_loadu_si256(buf + len - 3 * 32);
    t |= _mm256_loadu_si256(buf + len - 2 * 32); t |= _mm256_loadu_si256(buf + len - 1 * 32);
    return _mm256_testz_si256(t, t);
}

static int mkuffd(void){int u=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK); if(u<0){perror("userfaultfd");exit(1);}
  struct uffdio_api a={.api=UFFD_API,.features=0}; if(ioctl(u,UFFDIO_API,&a)){perror("API");exit(1);} return u;}
static void reg(int u,void*p,size_t len){struct uffdio_register r={.range={(uintptr_t)p,len},.mode=UFFDIO_REGISTER_MODE_MISSING};
  if(ioctl(u,UFFDIO_REGISTER,&r)){perror("REGISTER");exit(1);}}

static void bench_copy(const char*name,int hugetlb,size_t psz,size_t n,int zero){
  int u=mkuffd(); int fl=MAP_PRIVATE|MAP_ANONYMOUS|(hugetlb?MAP_HUGETLB:0);
  char*p=mmap(0,psz*n,PROT_READ|PROT_WRITE,fl,-1,0); if(p==MAP_FAILED){printf("%s: mmap failed (%s)\n",name,strerror(errno));close(u);return;}
  reg(u,p,psz*n); char*src=aligned_alloc(psz>PG?psz:PG,psz); for(size_t i=0;i<psz;i++)src[i]=i*7+1;
  double t0=now();
  for(size_t i=0;i<n;i++){
    if(zero){struct uffdio_zeropage z={.range={(uintptr_t)(p+i*psz),psz}}; if(ioctl(u,UFFDIO_ZEROPAGE,&z)){perror("ZEROPAGE");break;}}
    else{struct uffdio_copy c={.dst=(uintptr_t)(p+i*psz),.src=(uintptr_t)src,.len=psz}; if(ioctl(u,UFFDIO_COPY,&c)){perror("COPY");break;}}
  }
  double dt=now()-t0; printf("%-34s %8zu calls  %9.2f us/call  %7.2f GB/s\n",name,n,dt/n*1e6,psz*n/dt/1e9);
  munmap(p,psz*n); free(src); close(u);
}

/* fault round trip: a "vCPU" thread reads a missing page; the "fault thread" polls, reads the
   uffd_msg and resolves it with UFFDIO_COPY (the cost of the fault path without the network) */
static int U; static char*R; static volatile int stop;
static void*handler(void*a){char*src=aligned_alloc(PG,PG);memset(src,1,PG);struct pollfd pf={U,POLLIN};
  while(!stop){ if(poll(&pf,1,100)<=0)continue; struct uffd_msg m; if(read(U,&m,sizeof m)!=sizeof m)continue;
    struct uffdio_copy c={.dst=m.arg.pagefault.address&~(PG-1),.src=(uintptr_t)src,.len=PG}; ioctl(U,UFFDIO_COPY,&c);} return 0;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
static void bench_fault(size_t n){
  U=mkuffd(); R=mmap(0,PG*n,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); reg(U,R,PG*n);
  pthread_t th; pthread_create(&th,0,handler,0); double*l=malloc(n*sizeof *l); volatile char s=0;
  for(size_t i=0;i<n;i++){double t0=now(); s+=R[i*PG]; l[i]=now()-t0;}
  stop=1; pthread_join(th,0); qsort(l,n,sizeof *l,cmpd); double sum=0; for(size_t i=0;i<n;i++)sum+=l[i];
  printf("%-34s %8zu faults median %6.2f us  mean %6.2f us  p99 %6.2f us\n","fault->read msg->UFFDIO_COPY->wake",n,l[n/2]*1e6,sum/n*1e6,l[n*99/100]*1e6);
}

static void bench_zero(void){
  size_t n=1<<16; char*b=aligned_alloc(PG,PG*n); memset(b,0,PG*n); volatile int r=0; double t0=now();
  for(int rep=0;rep<4;rep++)for(size_t i=0;i<n;i++)r+=zero_avx2(b+i*PG,PG); double dt=now()-t0;
  printf("%-34s %8zu pages  %9.3f us/page (zero page: whole 4K scanned, 256 MiB working set)\n","buffer_is_zero avx2, zero",4*n,dt/(4*n)*1e6);
  for(size_t i=0;i<n;i++)b[i*PG+100]=1; t0=now();
  for(int rep=0;rep<4;rep++)for(size_t i=0;i<n;i++)r+=zero_avx2(b+i*PG,PG); dt=now()-t0;
  printf("%-34s %8zu pages  %9.3f us/page (marker at byte 100: early exit)\n","buffer_is_zero avx2, non-zero",4*n,dt/(4*n)*1e6);
  free(b);
}

/* the source's write path: header (8 B + first block name) + 4 KiB page as two iovecs, 64
   iovecs per writev (QEMUFile MAX_IOV_SIZE), over loopback TCP to a reader that consumes
   32 KiB reads (QEMUFile IO_BUF_SIZE) */
static int port;
static double reader_cpu;
static double cpu(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void*reader(void*a){int ls=*(int*)a; int s=accept(ls,0,0); char*buf=malloc(32768); long tot=0; ssize_t r;
  double c0=cpu(); while((r=read(s,buf,32768))>0)tot+=r; reader_cpu=cpu()-c0; close(s); return (void*)tot;}
static int connected(int*ls,pthread_t*th,void*(*fn)(void*)){
  *ls=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};
  bind(*ls,(void*)&a,sizeof a); socklen_t al=sizeof a; getsockname(*ls,(void*)&a,&al); listen(*ls,1);
  pthread_create(th,0,fn,ls); int s=socket(AF_INET,SOCK_STREAM,0); connect(s,(void*)&a,sizeof a); return s;}
/* per: pages per writev (32: QEMUFile's 64 iovecs; 1: the fixed cost of a writev shows). Wall
   time includes waiting for the reader; the sender thread's CPU time is what the migration
   thread spends (cpu.write + bytes x cpu.write-byte). */
static void bench_writev(size_t npages,int per){
  int ls; pthread_t th; int s=connected(&ls,&th,reader);
  char*ram=aligned_alloc(PG,PG*npages); for(size_t i=0;i<PG*npages;i+=64)ram[i]=i; uint64_t hdr[32];
  struct iovec iov[64]; double t0=now(),c0=cpu(); size_t i=0,calls=0;
  while(i<npages){int k=0; for(int j=0;j<per&&i<npages;j++,i++){hdr[j]=(i*PG)|0x28; iov[k].iov_base=&hdr[j];iov[k++].iov_len=8;
      iov[k].iov_base=ram+i*PG; iov[k++].iov_len=PG;}
    calls++;
    size_t want=0; for(int j=0;j<k;j++)want+=iov[j].iov_len; ssize_t w=writev(s,iov,k); if(w!=(ssize_t)want){/* short write: finish */
      size_t done=w>0?w:0; char*tmp=malloc(want),*q=tmp; for(int j=0;j<k;j++){memcpy(q,iov[j].iov_base,iov[j].iov_len);q+=iov[j].iov_len;}
      while(done<want){ssize_t x=write(s,tmp+done,want-done); if(x<=0)break; done+=x;} free(tmp);} }
  double dt=now()-t0,dc=cpu()-c0; shutdown(s,SHUT_WR); void*tot; pthread_join(th,&tot); close(s); close(ls);
  printf("writev %2dx(8B hdr+4K) loopback TCP %8zu pages  %9.3f us/page wall %6.2f GB/s; sender CPU %7.3f us/page, %7.3f us/writev; reader CPU (32 KiB reads) %7.3f us/page\n",
         per,npages,dt/npages*1e6,npages*(PG+8)/dt/1e9,dc/npages*1e6,dc/calls*1e6,reader_cpu/npages*1e6);
}
/* a 20-byte message and its reply (REQ_PAGES on the return path: one sendmsg by the fault
   thread, one read by the return-path thread), CPU time per message on each side */
static double echo_cpu;
static void*echo(void*a){int ls=*(int*)a; int s=accept(ls,0,0); int one=1; setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
  char buf[20]; double c0=cpu(); long n=0; while(read(s,buf,20)==20){n++; if(write(s,buf,20)!=20)break;} echo_cpu=(cpu()-c0)/(n?n:1); close(s); return 0;}
static void bench_message(size_t n){
  int ls; pthread_t th; int s=connected(&ls,&th,echo); int one=1; setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
  char buf[20]={0}; double t0=now(),c0=cpu();
  for(size_t i=0;i<n;i++){if(write(s,buf,20)!=20||read(s,buf,20)!=20)break;}
  double dt=now()-t0,dc=cpu()-c0; shutdown(s,SHUT_WR); pthread_join(th,0); close(s); close(ls);
  printf("20 B message + reply, loopback TCP %8zu round trips %7.2f us wall; CPU per message: sender %6.2f us, receiver %6.2f us\n",
         n,dt/n*1e6,dc/n*1e6,echo_cpu*1e6);
}

int main(int c,char**v){
  if(c>2&&!strcmp(v[2],"cpu")){bench_writev(1<<16,32);bench_writev(1<<16,1);bench_message(20000);return 0;}
  bench_zero();
  bench_copy("UFFDIO_COPY 4K (anon)",0,PG,1<<16,0);
  bench_copy("UFFDIO_ZEROPAGE 4K (anon)",0,PG,1<<16,1);
  bench_copy("UFFDIO_COPY 2M len on anon (512x4K)",0,2UL<<20,128,0);
  for(int k=0;k<3;k++)bench_copy("UFFDIO_COPY 2M (hugetlb)",1,2UL<<20,atoi(c>1?v[1]:"0"),0);
  bench_fault(20000);
  bench_writev(1<<16,32);
  bench_writev(1<<16,1);
  bench_message(20000);
  return 0;
}
